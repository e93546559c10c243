"""fedsilo-client: an institution's own tools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.errors import FedsiloError
from common.ledger import PrivacyLedger

app = typer.Typer(help="fedsilo for institutions: privacy budget and data tools.", no_args_is_help=True)
console = Console(soft_wrap=True)


@app.callback()
def _main() -> None:
    """fedsilo for institutions."""


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
