"""Plain text that spp writes for people: Markdown pipe tables (`spp run`'s `report.md`, `spp eval --compare`) and
the natural order of dotted names (`layers.2` before `layers.10`) in listings and error messages.

Pure string functions; nothing here reads or writes a file.
"""

from __future__ import annotations


def natural_key(name: str) -> list:
    """Sort key for a dotted name that orders `layers.2` before `layers.10`; at one position a number sorts
    before a word, so any two names compare."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def markdown_table(header: list[str], body: list[list[str]], align: str | None = None, pad: bool = False) -> str:
    """A Markdown pipe table of already formatted cells.

    Args:
        align: one letter per column: `l` left (rule `:---`), `r` right (`---:`), `-` unmarked (`---`, shown left);
            default `l` for the first column and `r` for the others.
        pad: pad each cell to its column's width (and the rule with it), so the table reads as plain text too.
    """
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))] if pad else []

    def line(cells: list[str]) -> str:
        if pad:
            cells = [c.rjust(w) if a == "r" else c.ljust(w) for c, a, w in zip(cells, align, widths)]
        return "| " + " | ".join(cells) + " |"

    if pad:
        rule = [{"l": ":" + "-" * (w + 1), "r": "-" * (w + 1) + ":", "-": "-" * (w + 2)}[a] for a, w in zip(align, widths)]
    else:
        rule = [{"l": ":---", "r": "---:", "-": "---"}[a] for a in align]
    return "\n".join([line(header), "|" + "|".join(rule) + "|", *(line(row) for row in body)])
