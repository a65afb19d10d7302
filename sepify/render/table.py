"""Tables that fit the terminal: columns dropped by priority, node names shortened in the middle.

Every table sepify prints is drawn here (with rich).  ``width`` is the room there is: the
terminal's (``COLUMNS`` honoured), or None when stdout is no terminal — a file or a pipe gets
every column at its natural width and no line is ever wrapped (:func:`output_width`).  When a
table is wider than ``width``: node-name columns are shortened with an ellipsis in the middle
(the head and the distinctive tail stay), then columns are dropped, least important first, and
what still does not fit is folded inside its cell.  The caller prints which columns were left out.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Sequence

MIN_NAME = 18  # a shortened node name keeps at least this many characters
NATURAL = 100_000  # "no limit": the console width used when nothing constrains it


def output_width(stream=None) -> int | None:
    """The width to render for: ``COLUMNS`` when set, else the terminal's when ``stream`` (stdout)
    is one, else None (natural width: files and pipes are never wrapped)."""
    stream = sys.stdout if stream is None else stream
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return shutil.get_terminal_size().columns if tty else None


def cell_len(text: str) -> int:
    from rich.cells import cell_len as rich_len

    return max((rich_len(line) for line in str(text).splitlines()), default=0)


def middle_ellipsis(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters with "…" in the middle (more of the tail kept:
    the end of a node name is what tells nodes apart)."""
    if len(text) <= limit or limit < 5:
        return text
    head = (limit - 1) * 2 // 5
    tail = limit - 1 - head
    return text[:head] + "…" + text[len(text) - tail:]


@dataclass
class Column:
    header: str
    justify: str = "right"
    keep: int = 50  # priority: the lowest is dropped first; 100 is never dropped
    name: bool = False  # node names: shortened with a middle ellipsis before any column is dropped
    fold: int = 0  # free text: may be folded inside its cell down to this width (0: never narrowed)


def console(buf, width: int | None):
    from rich.console import Console

    return Console(file=buf, width=width or NATURAL, force_terminal=False, color_system=None, highlight=False,
                   emoji=False, markup=False)


def _table_width(widths: Sequence[int]) -> int:
    # rich's default box: a border and one space of padding on each side of every cell
    return sum(widths) + 3 * len(widths) + 1


def fit_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None, *, title: str | None = None,
              caption: str | None = None):
    """(rich Table, headers of the dropped columns).  Columns empty in every row are always left out
    (and not reported)."""
    from rich.table import Table

    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    idx = [i for i, _ in enumerate(columns) if any(r[i] for r in rows) or not rows]
    dropped: list[str] = []
    if width is not None:
        natural = {i: max([cell_len(columns[i].header)] + [cell_len(r[i]) for r in rows]) for i in idx}
        limits = dict(natural)
        # 1. shorten the node names, down to what the other columns leave (not below MIN_NAME)
        over = _table_width([limits[i] for i in idx]) - width
        for i in (i for i in idx if columns[i].name):
            if over <= 0:
                break
            floor = max(MIN_NAME, cell_len(columns[i].header))
            cut = min(over, limits[i] - floor)
            if cut > 0:
                limits[i] -= cut
                over -= cut
        # 2. keep the columns that fit, most important first (a wide column left out can leave room
        #    for a narrower, less important one)
        if over > 0:
            chosen = [i for i in idx if columns[i].keep >= 100]
            for i in (i for i in chosen if columns[i].fold):  # essential free text folds to what is left
                room = width - _table_width([limits[j] for j in chosen if j != i] + [0])
                limits[i] = max(min(limits[i], room), columns[i].fold)
            for i in sorted((i for i in idx if columns[i].keep < 100), key=lambda j: (-columns[j].keep, j)):
                room = width - _table_width([limits[j] for j in chosen] + [0])
                if limits[i] <= room:
                    chosen.append(i)
                elif columns[i].fold and room >= columns[i].fold:
                    limits[i] = room
                    chosen.append(i)
            dropped = [columns[i].header for i in idx if i not in chosen]
            idx = [i for i in idx if i in chosen]
            over = _table_width([limits[j] for j in idx]) - width
        # 3. give the names back what dropping columns freed
        spare = -over
        for i in (i for i in idx if columns[i].name):
            if spare <= 0:
                break
            grow = min(spare, natural[i] - limits[i])
            limits[i] += grow
            spare -= grow
        rows = [[middle_ellipsis(c, limits[i]) if columns[i].name else c for i, c in enumerate(r)] for r in rows]
    table = Table(title=title, caption=caption)
    for i in idx:
        col = columns[i]
        narrowed = width is not None and col.fold and limits[i] < natural[i]
        table.add_column(col.header, justify=col.justify, overflow="fold", max_width=limits[i] if narrowed else None)
    for r in rows:
        table.add_row(*[r[i] for i in idx])
    return table, dropped


def dropped_note(dropped: Sequence[str], width: int | None) -> str | None:
    if not dropped:
        return None
    return f"(left out to fit {width} columns: {', '.join(dropped)}; a wider terminal or a pipe shows them)"


def render(parts, width: int | None) -> str:
    """Print ``parts`` (rich renderables or strings; None skipped) to a string at ``width``."""
    buf = io.StringIO()
    c = console(buf, width)
    for part in parts:
        if part is None:
            continue
        c.print(part, soft_wrap=width is None)
    return buf.getvalue()


__all__ = ["Column", "MIN_NAME", "cell_len", "console", "dropped_note", "fit_table", "middle_ellipsis",
           "output_width", "render"]
