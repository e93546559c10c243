"""fedsilo-client: an institution's own tools."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedsilo.client.budget import budget_summary
from fedsilo.client.check import check_table
from fedsilo.client.processes import Node, node_config, run_institution
from fedsilo.common.cli import exit_on_error
from fedsilo.common.errors import FedsiloError
from fedsilo.common.schema import Schema
from fedsilo.common.settings import Proposal

app = typer.Typer(help="fedsilo for institutions: privacy budget and data tools.", no_args_is_help=True)
console = Console(soft_wrap=True)
DEFAULTS = Proposal()


@app.callback()
def _main() -> None:
    """fedsilo for institutions."""


@app.command()
def check(
    data: Annotated[Path, typer.Option(help="The institution's table: CSV or Parquet.")],
    schema: Annotated[Path, typer.Option(help="The federation schema (TOML).")],
    delimiter: Annotated[str | None, typer.Option(help="CSV delimiter (default: detected).")] = None,
    batch_size: Annotated[
        int, typer.Option(help="Batch size the federation trains with (0: the recipe's, never above the records).")
    ] = DEFAULTS.train.batch_size,
    delta: Annotated[float, typer.Option(help="Delta of the institution's privacy policy.")] = DEFAULTS.privacy.delta,
) -> None:
    """Check a table against the federation schema; exit 0 if it fits, 2 with the reason if not. Writes nothing."""
    with exit_on_error(console):
        summary = check_table(data, Schema.load(schema), batch_size=batch_size, delta=delta, delimiter=delimiter)
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
    policy: Annotated[
        Path | None, typer.Option(help="The institution's privacy policy (default: STATE_DIR/policy.toml if present).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show the epsilon spent over every ledger composed (what the budget is checked against), and per run.

    The budget covers every dataset's ledger in the state directory together, so the
    total and what remains are of the composition; each dataset's own figure is shown
    beside it, marked as alone. Figures are for the policy's neighbouring relation
    (default replace-one); the total is also shown under the other one.
    """
    with exit_on_error(console):
        summary = budget_summary(state_dir, policy)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    table = Table(title=f"Privacy spent ({state_dir})")
    for column in ("dataset", "run", "rounds", "epsilon of the run", "dataset's epsilon after it (alone)"):
        table.add_column(column)
    for row in summary["datasets"]:
        for run in row["runs"]:
            table.add_row(
                row["dataset"],
                run["run_id"],
                str(run["rounds"]),
                f"{run['epsilon']:.3f}",
                f"{run['epsilon_after']:.3f}",
            )
    console.print(table)
    for row in summary["datasets"]:
        console.print(
            f"dataset {row['dataset']} alone: epsilon {row['epsilon']:.3f} at delta {summary['delta']:g} "
            f"({summary['neighbouring']})"
        )
        if row["distributed_rounds"]:
            console.print(
                f"  of which {row['distributed_rounds']} distributed round(s); with its own noise share alone "
                f"(no other institution honest): epsilon {row['epsilon_worst_case']:.3f}"
            )
    left = (
        f"{summary['remaining']:.3f} of max-epsilon {summary['max_epsilon']:g} remains"
        if summary["max_epsilon"] is not None
        else "remaining: unknown (pass --policy)"
    )
    console.print(
        f"spent: epsilon {summary['epsilon']:.3f} at delta {summary['delta']:g} ({summary['neighbouring']} "
        f"neighbours), every ledger composed ({len(summary['datasets'])} dataset(s)), as the budget is enforced; "
        f"{left}"
    )
    console.print(
        f"by neighbouring relation: add-remove epsilon {summary['epsilon_add_remove']:.3f}, "
        f"replace-one epsilon {summary['epsilon_replace_one']:.3f} (the record count is public: replace-one holds)"
    )
    if summary["distributed_rounds"]:
        console.print(
            f"worst case: epsilon {summary['epsilon_worst_case']:.3f} if no other institution was honest in the "
            f"{summary['distributed_rounds']} distributed round(s) (each with its own noise share alone)"
        )


@app.command()
def keys(directory: Annotated[Path, typer.Argument(help="Where to write node.key and node.key.pub.")]) -> None:
    """Make this institution's node key pair (ECDSA P-384, OpenSSH); send the .pub file to the coordinator."""
    from fedsilo.runtime.keys import fingerprint, new_node_keys

    with exit_on_error(console):
        public = new_node_keys(directory / "node.key")
    console.print(f"private key: {directory / 'node.key'} (mode 0600; it never leaves this institution)")
    console.print(f"public key:  {public} (send it to the coordinator)")
    console.print(f"fingerprint: {fingerprint(public.read_bytes().strip())} (tell it to the coordinator separately)")


@app.command()
def start(
    server: Annotated[str, typer.Option(help="The coordinator's SuperLink, HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="The federation's CA certificate (ca.crt from the coordinator).")],
    key: Annotated[Path, typer.Option(help="This institution's node private key (from `keys`).")],
    data: Annotated[Path, typer.Option(help="The institution's table: CSV or Parquet.")],
    schema: Annotated[Path, typer.Option(help="The federation schema (TOML) from the coordinator.")],
    policy: Annotated[Path, typer.Option(help="This institution's privacy policy (TOML).")],
    state_dir: Annotated[Path, typer.Option(help="Where the privacy ledger and Flower's files live.")],
    name: Annotated[
        str | None, typer.Option(help="The name the coordinator admitted (default: --state-dir's name).")
    ] = None,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's ClientApp API.")] = 9094,
    max_retries: Annotated[
        int | None, typer.Option(help="Give up after this many failed connection attempts (default: never).")
    ] = None,
    warm_trainer: Annotated[
        bool,
        typer.Option(help="Keep torch and the records loaded in a trainer process (about 0.5 GB) for faster rounds."),
    ] = True,
) -> None:
    """Check the data, then run this institution's SuperNode until interrupted."""
    from fedsilo.client.policy import deployed_policy

    with exit_on_error(console, note="the SuperNode was not started"):
        for path, what in ((ca, "--ca"), (key, "--key")):
            if not path.is_file():
                raise FedsiloError(f"{what} {path}: no such file")
        limits = deployed_policy({"policy-path": str(policy)})
        summary = check_table(
            data, Schema.load(schema), batch_size=DEFAULTS.train.batch_size, delta=limits.accounting_delta(DEFAULTS)
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    if policy.resolve() != (state_dir / "policy.toml").resolve():
        shutil.copyfile(policy, state_dir / "policy.toml")  # what `budget` reads by default
    who = name or state_dir.resolve().name
    console.print(f"{summary.path}: {summary.rows} records fit the schema")
    console.print(f"policy: {limits.to_mapping()}")
    # The SuperNode enforces the copy in the state directory, which `budget` also reads.
    config = node_config(name=who, data=data, schema=schema, policy=state_dir / "policy.toml", state_dir=state_dir)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # before anything starts: it is always stopped with us
    node = Node(who, server, ca, key, config, state_dir, port=port, max_retries=max_retries, warm_trainer=warm_trainer)
    with exit_on_error(console, code=1):
        run_institution(node, say=console.print)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
