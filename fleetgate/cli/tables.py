"""The one way the command line prints a table: a header row and data rows of text,
every column but the last padded to its widest cell, columns two spaces apart,
nothing at the end of a line."""

from __future__ import annotations

from collections.abc import Sequence


def table_lines(rows: Sequence[Sequence[str]], *, last_gap: str = "  ") -> list[str]:
    """``rows`` (the header first) as aligned lines. ``last_gap`` is put before the
    last column instead of the usual two spaces."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        padded = "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False))
        lines.append(f"{padded}{last_gap}{row[-1]}".rstrip() if widths else row[-1].rstrip())
    return lines


def print_table(rows: Sequence[Sequence[str]], *, last_gap: str = "  ") -> None:
    """Print :func:`table_lines` to standard output."""
    for line in table_lines(rows, last_gap=last_gap):
        print(line)
