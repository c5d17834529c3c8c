"""The shipped run configs (package data), addressable by name: ``synthetic/m3vit_tiny``,
``pascal_context/m3vit_small``, ... (``m3vit.engine.config.resolve_config_path``)."""
