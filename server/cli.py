"""fedsilo-server: the coordinator's tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from common.cli import print_error

app = typer.Typer(help="fedsilo for coordinators.", no_args_is_help=True)
console = Console(soft_wrap=True)


@app.callback()
def _main() -> None:
    """fedsilo for coordinators."""


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (holds report.json).")]) -> None:
    """Summarise a finished run: accuracy and each institution's privacy."""
    path = run_dir / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print_error(console, f"cannot read {path}: {err}")
        raise typer.Exit(2) from None
    table = Table(
        title=f"{run_dir}: {data['rounds_completed']} rounds, secure aggregation {data['secure_aggregation']}"
    )
    for column in ("institution", "records", "epsilon", "delta", "rounds trained", "refusals"):
        table.add_column(column)
    for inst in data["institutions"]:
        table.add_row(
            inst["name"],
            str(inst["num_examples"]),
            str(inst["epsilon"]),
            f"{inst['delta']:g}",
            str(len(inst["ledger"])),
            str(len(inst["refusals"])),
        )
    console.print(table)
    console.print(f"final metrics: {data['final_metrics']}")


def main() -> None:  # pragma: no cover - console-script entry point
    app()
