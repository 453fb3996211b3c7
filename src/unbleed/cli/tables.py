"""Terminal tables that fit the terminal without cutting a word: :func:`print_table` prints rows under headers in
one rich table when it fits the console's width, and otherwise splits the columns into as few tables as fit, each
repeating the first (key) column — no header and no value is ever truncated to ``…`` (a header or value too wide
for the terminal on its own is the one thing left to rich's wrapping)."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

def _text(cell) -> Text:
    return cell if isinstance(cell, Text) else Text(str(cell))  # plain text: "[-0.12, +0.03]" is no markup


def _table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence], columns: Sequence[int],
           sections: Sequence[bool]) -> Table:
    table = Table(title=title)
    for i in (0, *columns):
        table.add_column(_text(headers[i]), no_wrap=True, justify="left" if i == 0 else "right")
    for row, end in zip(rows, sections):
        table.add_row(*(_text(row[i]) for i in (0, *columns)), end_section=end)
    return table


def _fits(console: Console, table: Table) -> bool:
    wide = console.options.update_width(10**6)  # measured unbounded (a measurement is clamped to the width given)
    return Measurement.get(console, wide, table).maximum <= console.width


def split_columns(console: Console, title: str | None, headers: Sequence[str], rows: Sequence[Sequence],
                  sections: Sequence[bool] | None = None) -> list[Table]:
    """``headers`` (the first one the key column's) and ``rows`` as tables that each fit ``console.width``: one
    titled ``title`` when it fits, else the value columns split evenly over as few tables as fit, each with the key
    column first and titled ``part i of n``. ``sections``: per row, whether a rule follows it."""
    sections = list(sections) if sections is not None else [False] * len(rows)
    values = list(range(1, len(headers)))
    for parts in range(1, max(len(values), 1) + 1):
        size = -(-len(values) // parts)
        chunks = [values[i:i + size] for i in range(0, len(values), size)]
        tables = [_table(title if len(chunks) == 1 else f"part {k + 1} of {len(chunks)}", headers, rows, chunk,
                         sections) for k, chunk in enumerate(chunks)]
        if all(_fits(console, t) for t in tables):
            return tables
    return tables  # one value column per table and still too wide: rich wraps what it must


def print_table(console: Console, title: str | None, headers: Sequence[str], rows: Sequence[Sequence],
                sections: Sequence[bool] | None = None) -> None:
    """Print :func:`split_columns`' tables on ``console`` (when they are parts, ``title`` first, on its own line
    wrapped at the console's width)."""
    tables = split_columns(console, title, headers, rows, sections)
    if len(tables) > 1 and title:
        console.print(Text(title, style="italic"))
    for table in tables:
        console.print(table)


__all__ = ["split_columns", "print_table"]
