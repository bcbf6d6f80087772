"""Plain-text tables that never cut a value.

Peer ids and multiaddrs are copied out of tables into other commands, so a table is
never fitted to the terminal: columns are as wide as their widest value, a cell with
several lines (a peer's addresses) continues on the next lines, and a terminal that is
too narrow wraps the whole line, which copies back as one. `--json` gives the same data
for scripts.
"""

from __future__ import annotations

from collections.abc import Sequence

from meshnode.cli.common import out

GAP = "  "


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    cells = [[str(c).split("\n") for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in lines))
    out_lines = [GAP.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        height = max(len(lines) for lines in row)
        for k in range(height):
            parts = [(lines[k] if k < len(lines) else "").ljust(w)
                     for lines, w in zip(row, widths, strict=True)]
            out_lines.append(GAP.join(parts).rstrip())
    return "\n".join(out_lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    out.print(title, style="bold", highlight=False)
    out.print(format_table(headers, rows), markup=False, highlight=False, crop=False)


def printable(text: str) -> str:
    """Peer-provided text with control characters (terminal escapes) made visible."""
    return "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)
