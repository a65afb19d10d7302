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
    """(:class:`PlainTable`, headers of the dropped columns).  Columns empty in every row are always
    left out (and not reported)."""
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
    cols = []
    for i in idx:
        col = columns[i]
        narrowed = width is not None and col.fold and limits[i] < natural[i]
        cols.append((col.header, col.justify, limits[i] if narrowed else None))
    return PlainTable(cols, [[r[i] for i in idx] for r in rows], title, caption), dropped


def dropped_note(dropped: Sequence[str], width: int | None) -> str | None:
    if not dropped:
        return None
    return f"(left out to fit {width} columns: {', '.join(dropped)}; a wider terminal or a pipe shows them)"


@dataclass
class PlainTable:
    """A table as :func:`fit_table` laid it out: ``(header, justify, max_width)`` per column, rows of
    strings.  Drawn by rich's default table (:meth:`rich_table`), or — for files and pipes, where
    nothing is wrapped — by :func:`plain_lines`, the same characters without rich's layout engine
    (an audit of a 50-conv model spent 0.1 s of its 0.85 s in rich)."""

    columns: list[tuple[str, str, int | None]]
    rows: list[list[str]]
    title: str | None = None
    caption: str | None = None

    def rich_table(self):
        from rich.table import Table

        table = Table(title=self.title, caption=self.caption)
        for header, justify, max_width in self.columns:
            table.add_column(header, justify=justify, overflow="fold", max_width=max_width)
        for r in self.rows:
            table.add_row(*r)
        return table


def _plain_text(text: str) -> bool:
    """Text that rich prints unchanged at natural width: one line, no tabs or control characters, no
    surrounding spaces, every character one cell wide as rich measures it (not East Asian wide ones,
    not combining marks)."""
    return text == text.strip() and text.isprintable() and (text.isascii() or cell_len(text) == len(text))


def plain_lines(table: PlainTable) -> str | None:
    """``table`` as rich draws it unwrapped (``soft_wrap``; box ``HEAVY_HEAD``, one space of padding,
    title and caption as lines of their own), or None for what only rich lays out faithfully (a
    narrowed column, multi-line or wide-character text)."""
    cells = [h for h, _, _ in table.columns] + [c for r in table.rows for c in r]
    extra = [t for t in (table.title, table.caption) if t]
    if (not table.columns or any(m is not None for _, _, m in table.columns)
            or not all(_plain_text(c) for c in cells if c) or not all(_plain_text(t) for t in extra)):
        return None
    widths = [max([len(h)] + [len(r[i]) for r in table.rows]) for i, (h, _, _) in enumerate(table.columns)]

    def line(values, left, mid, right):
        out = []
        for v, w, (_, justify, _) in zip(values, widths, table.columns):
            gap = w - len(v)
            if justify == "right":
                v = " " * gap + v
            elif justify == "center":
                v = " " * (gap // 2) + v + " " * (gap - gap // 2)
            else:
                v = v + " " * gap
            out.append(f" {v} ")
        return left + mid.join(out) + right

    def rule(left, fill, mid, right):
        return left + mid.join(fill * (w + 2) for w in widths) + right

    out = [table.title] if table.title else []
    out += [rule("┏", "━", "┳", "┓"), line([h for h, _, _ in table.columns], "┃", "┃", "┃"), rule("┡", "━", "╇", "┩")]
    out += [line(r, "│", "│", "│") for r in table.rows]
    out.append(rule("└", "─", "┴", "┘"))
    if table.caption:
        out.append(table.caption)
    return "\n".join(out) + "\n"


def render(parts, width: int | None) -> str:
    """Print ``parts`` (:class:`PlainTable`, rich renderables or strings; None skipped) to a string at
    ``width``.  Unwrapped output (``width`` None) of plain tables and one-line strings is written
    directly; the rest goes through rich."""
    buf = io.StringIO()
    c = None
    for part in parts:
        if part is None:
            continue
        if width is None:
            text = (plain_lines(part) if isinstance(part, PlainTable)
                    else part + "\n" if isinstance(part, str) and (not part or _plain_text(part)) else None)
            if text is not None:
                buf.write(text)
                continue
        if c is None:
            c = console(buf, width)
        c.print(part.rich_table() if isinstance(part, PlainTable) else part, soft_wrap=width is None)
    return buf.getvalue()


__all__ = ["Column", "MIN_NAME", "PlainTable", "cell_len", "console", "dropped_note", "fit_table", "middle_ellipsis",
           "output_width", "plain_lines", "render"]
