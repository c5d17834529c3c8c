"""The bottom layer: the error contract, safe file output, tables and figures (imports nothing above it)."""
