"""Plain-text and Markdown tables for reports and the command line (one layout, callers format cells)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence], cell: Callable[[object], str] = str,
                 sep: str = " | ", markdown: bool = False) -> str:
    """Rows under ``headers``; every non-string cell goes through ``cell``.

    Plain text: the first column left-aligned, the others right-aligned, columns joined by ``sep`` and
    a rule under the header (``-+-`` where ``sep`` has a bar). ``markdown=True``: a Markdown table.
    """
    cells = [list(headers)] + [[c if isinstance(c, str) else cell(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [sep.join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, sep.replace(" ", "-").replace("|", "+").join("-" * w for w in widths))
    return "\n".join(lines)
