"""fedsilo-client: an institution's own tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from client.check import check_table
from common.errors import FedsiloError
from common.ledger import PrivacyLedger
from common.schema import Schema
from common.settings import RunSettings

app = typer.Typer(help="fedsilo for institutions: privacy budget and data tools.", no_args_is_help=True)
console = Console(soft_wrap=True)
DEFAULTS = RunSettings()


@app.callback()
def _main() -> None:
    """fedsilo for institutions."""


@app.command()
def check(
    data: Annotated[Path, typer.Option(help="The institution's table: CSV or Parquet.")],
    schema: Annotated[Path, typer.Option(help="The federation schema (TOML).")],
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: detected).")] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size the federation trains with.")] = DEFAULTS.train.batch_size,
    delta: Annotated[float, typer.Option(help="Delta of the institution's privacy policy.")] = DEFAULTS.privacy.delta,
) -> None:
    """Check a table against the federation schema; exit 0 if it fits, 2 with the reason if not. Writes nothing."""
    try:
        summary = check_table(data, Schema.load(schema), batch_size=batch_size, delta=delta, delimiter=delimiter)
    except FedsiloError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"{summary.path}: {summary.rows} records fit the schema ({summary.num_inputs} model inputs)")
    balance = ", ".join(f"{k} {v} ({v / summary.rows:.0%})" for k, v in summary.label_counts.items())
    console.print(f"label balance: {balance}")
    table = Table(title="Declared columns")
    for column in ("column", "missing", "clipped to bounds"):
        table.add_column(column)
    for name, missing in summary.missing.items():
        table.add_row(name, str(missing), str(summary.clipped.get(name, "-")))
    console.print(table)
    console.print(
        f"ignored columns: {summary.ignored or 'none'}; unexpected columns (not used): {summary.unexpected or 'none'}"
    )
    for column in summary.identifier_like:
        console.print(
            f"[yellow]privacy warning:[/yellow] column '{column}' is unique per record and looks like an "
            "identifier; keep it out of the features and out of anything you share"
        )


@app.command()
def budget(
    state_dir: Annotated[Path, typer.Option(help="The institution's state directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show, per dataset, each run's rounds and the epsilon spent (from the privacy ledger)."""
    paths = sorted((state_dir / "ledgers").glob("*.json"))
    if not paths:
        console.print(f"[red]error:[/red] no privacy ledger under {state_dir / 'ledgers'}; check --state-dir")
        raise typer.Exit(2)
    rows: list[dict[str, Any]] = []
    try:
        for path in paths:
            ledger = PrivacyLedger.for_dataset(state_dir, path.stem)
            delta = max((e.delta for e in ledger.entries), default=1e-5)
            runs: dict[str, int] = {}
            for entry in ledger.entries:
                runs[entry.run_id] = runs.get(entry.run_id, 0) + 1
            rows.append({"dataset": path.stem, "delta": delta, "epsilon": ledger.epsilon(delta=delta), "runs": runs})
    except FedsiloError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"Privacy spent ({state_dir})")
    for column in ("dataset", "runs (rounds)", "epsilon", "delta"):
        table.add_column(column)
    for row in rows:
        runs_text = ", ".join(f"{k} ({v})" for k, v in row["runs"].items())
        table.add_row(row["dataset"], runs_text, f"{row['epsilon']:.3f}", f"{row['delta']:g}")
    console.print(table)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
