"""Fitting a table of names and numbers into the terminal's width without making names ambiguous.

Number columns give way first (the least telling ones are dropped); only then are names shortened,
by eliding their middle at a place that keeps every name distinct: ``blocks.2.linear.weight`` and
``blocks.2.linear.bias`` never both become ``blocks.2.linear.…``.
"""

from __future__ import annotations

from dataclasses import dataclass

GAP = 2  # rich's Table with box=None puts one space of padding on each side of a column
ELLIPSIS = "…"
MIN_NAME = 16  # names are not elided below this width: columns go first


@dataclass
class Column:
    """A column of plain cell texts; ``droppable`` columns are left out, in ``drop_order``, to fit."""

    header: str
    cells: list[str]
    droppable: bool = True
    drop_order: int = 0

    @property
    def width(self) -> int:
        return max([len(self.header), *(len(c) for c in self.cells)])


def fit(names: list[str], name_header: str, columns: list[Column], width: int) -> tuple[list[str], list[Column]]:
    """The names (elided if needed) and the columns kept, so that the table fits in ``width``.

    Returns:
        ``(names, kept_columns)``: columns keep their order; names are distinct whenever the inputs are.
    """
    kept = list(columns)
    name_width = max([len(name_header), *(len(n) for n in names)])

    def total(name_w: int) -> int:
        return name_w + sum(c.width + GAP for c in kept)

    for column in sorted((c for c in columns if c.droppable), key=lambda c: c.drop_order):
        if total(name_width) <= width:
            break
        kept.remove(column)
    room = max(width - total(0), MIN_NAME, len(name_header))
    return (elide(names, room) if name_width > room else names), kept


def elide(names: list[str], width: int) -> list[str]:
    """Every name longer than ``width`` shortened to ``width`` by replacing its middle with ``…``.

    Cuts that keep the last dotted parts whole (``blocks.…ln2.weight``) are tried first, then cuts
    at every place; the first that keeps the names as distinct as the originals wins. Where no cut of
    that width can, the width grows until one does (a wider table beats a misleading one).
    """
    distinct = len(set(names))
    longest = max((len(n) for n in names), default=0)
    for w in range(max(width, 3), longest + 1):
        for cut in _cuts(w):
            short = [n if len(n) <= w else cut(n) for n in names]
            if len(set(short)) == distinct:
                return short
    return names


def _cuts(width: int) -> list:
    """Ways to cut a name to ``width``: keeping its last 1-3 dotted parts, then tails of each length."""
    cuts = [lambda n, k=k: _keep_parts(n, width, k) for k in (1, 2, 3)]
    kept = width - 1  # characters left besides the ellipsis
    half = kept // 2
    tails = [half] + [t for step in range(1, kept) for t in (half + step, half - step) if 1 <= t < kept]
    return cuts + [lambda n, t=t: n[: width - 1 - t] + ELLIPSIS + n[-t:] for t in tails]


def _keep_parts(name: str, width: int, parts: int) -> str:
    tail = "." + ".".join(name.split(".")[-parts:])
    if len(tail) >= width - 1 or "." not in name:
        tail = name[-(width // 2) :]
    return name[: width - 1 - len(tail)] + ELLIPSIS + tail
