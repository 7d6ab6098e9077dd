"""The project's one table formatter: a Markdown table whose columns line up in a terminal too."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table: `header`, then `rows` (cells as text, None as empty), columns padded to one width.

    align: one letter per column, 'l' or 'r' (missing letters: the first column left, the rest right).
    """
    align = align.ljust(len(header), "r") if align else "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r}: one of 'l' or 'r' per column of {list(header)}")
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    if any(len(row) != len(header) for row in cells):
        raise ValueError(f"every row needs {len(header)} cells, one per column of {list(header)}")
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
