"""Output for people (rich tables, one row per interval) and for machines (``--json``: JSON lines)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)  # lines stay whole in logs and pipes
error_console = Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(record: dict[str, Any]) -> None:
    """One JSON object on its own line, flushed, so a reader can follow along."""
    sys.stdout.write(json.dumps(record, separators=(",", ":"), default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def key_value_table(title: str, rows: Sequence[tuple[str, Any]]) -> Table:
    """A two-column table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


class RowPrinter:
    """A table printed a row at a time, for live views that also read well in a log."""

    def __init__(self, columns: Sequence[tuple[str, int]]) -> None:
        self.columns = columns
        self._printed_header = False

    def row(self, *values: Any) -> None:
        if not self._printed_header:
            console.print("  ".join(f"[bold]{name:>{width}}[/bold]" for name, width in self.columns), soft_wrap=True)
            self._printed_header = True
        cells = (f"{value!s:>{width}}" for value, (_, width) in zip(values, self.columns, strict=True))
        console.print("  ".join(cells), soft_wrap=True)
