"""What the three command-line tools share: the one error handler and the institutions' table."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedsilo.common.errors import FedsiloError


def print_error(console: Console, message: object) -> None:
    """Print ``error: MESSAGE``; the message is text, never rich markup (it may hold ``[table]`` names)."""
    console.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)


@contextmanager
def exit_on_error(console: Console, code: int = 2, *, note: str = "") -> Iterator[None]:
    """Turn a ``FedsiloError`` into ``error: MESSAGE`` (then ``note``) and exit with ``code``."""
    try:
        yield
    except FedsiloError as err:
        print_error(console, err)
        if note:
            console.print(note)
        raise typer.Exit(code) from None


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table: fixed digits, ``inf``, or ``-`` for none."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def institutions_table(report: Mapping[str, Any]) -> Table:
    """A run's institutions (``report.json``): weight, privacy spent and its neighbours, rounds trained and refused."""
    table = Table(title="Institutions")
    for column in ("institution", "weight", "epsilon", "neighbours", "delta", "rounds trained", "rounds refused"):
        table.add_column(column, justify="left" if column == "institution" else "right")
    for inst in report["institutions"]:
        table.add_row(
            inst["name"],
            str(inst["num_examples"]),
            fmt(inst["epsilon"], 3),
            str(inst.get("neighbouring", "add-remove")),  # reports written before it was named: add/remove
            f"{inst['delta']:g}",
            str(len(inst["ledger"])),
            str(len(inst["refusals"])),
        )
    return table
