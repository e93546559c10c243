"""fedsilo-client: an institution's own tools."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from client.check import check_table
from client.policy import PrivacyPolicy
from common.accounting import epsilon_spent
from common.cli import print_error
from common.errors import FedsiloError
from common.ledger import PrivacyLedger
from common.schema import Schema
from common.settings import RunSettings
from runtime.processes import flower_env, stop_process

app = typer.Typer(help="fedsilo for institutions: privacy budget and data tools.", no_args_is_help=True)
console = Console(soft_wrap=True)
DEFAULTS = RunSettings()
ACTIVATION_ATTEMPTS = 12  # a SuperNode refused at start is retried for about two minutes
ACTIVATION_WINDOW_S = 30.0
ACTIVATION_PAUSE_S = 10


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
    try:
        summary = check_table(data, Schema.load(schema), batch_size=batch_size, delta=delta, delimiter=delimiter)
    except FedsiloError as err:
        print_error(console, err)
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
    policy: Annotated[
        Path | None, typer.Option(help="The institution's privacy policy (default: STATE_DIR/policy.toml if present).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show, per dataset, each run's rounds and epsilon, the total spent and what remains of the budget."""
    paths = sorted((state_dir / "ledgers").glob("*.json"))
    if not paths:
        print_error(console, f"no privacy ledger under {state_dir / 'ledgers'}; check --state-dir")
        raise typer.Exit(2)
    if policy is None and (state_dir / "policy.toml").exists():
        policy = state_dir / "policy.toml"
    try:
        limits = PrivacyPolicy.load(policy) if policy else None
        rows = [_budget_row(state_dir, path.stem, limits) for path in paths]
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"Privacy spent ({state_dir})")
    for column in ("dataset", "run", "rounds", "epsilon of the run", "epsilon after it"):
        table.add_column(column)
    for row in rows:
        for run in row["runs"]:
            table.add_row(
                row["dataset"],
                run["run_id"],
                str(run["rounds"]),
                f"{run['epsilon']:.3f}",
                f"{run['epsilon_after']:.3f}",
            )
    console.print(table)
    for row in rows:
        left = (
            f"{row['remaining']:.3f} of max-epsilon {row['max_epsilon']:g} remains"
            if row["max_epsilon"] is not None
            else "remaining: unknown (pass --policy)"
        )
        console.print(f"dataset {row['dataset']}: epsilon {row['epsilon']:.3f} spent at delta {row['delta']:g}; {left}")


def _budget_row(state_dir: Path, fingerprint: str, limits: PrivacyPolicy | None) -> dict[str, Any]:
    """One dataset's ledger, per run (in the order runs first trained), at the policy's delta."""
    ledger = PrivacyLedger.for_dataset(state_dir, fingerprint)
    recorded = max((e.delta for e in ledger.entries), default=DEFAULTS.privacy.delta)
    delta = limits.delta if limits is not None and limits.delta is not None else recorded
    runs: list[dict[str, Any]] = []
    for run_id in dict.fromkeys(e.run_id for e in ledger.entries):
        own = [e for e in ledger.entries if e.run_id == run_id]
        last = max(i for i, e in enumerate(ledger.entries) if e.run_id == run_id)
        runs.append(
            {
                "run_id": run_id,
                "rounds": len(own),
                "epsilon": epsilon_spent([e.event() for e in own], delta=delta),
                "epsilon_after": epsilon_spent([e.event() for e in ledger.entries[: last + 1]], delta=delta),
            }
        )
    spent = ledger.epsilon(delta=delta)
    max_epsilon = limits.max_epsilon if limits is not None else None
    return {
        "dataset": fingerprint,
        "delta": delta,
        "epsilon": spent,
        "max_epsilon": max_epsilon,
        "remaining": None if max_epsilon is None else max(0.0, max_epsilon - spent),
        "runs": runs,
    }


@app.command()
def keys(directory: Annotated[Path, typer.Argument(help="Where to write node.key and node.key.pub.")]) -> None:
    """Make this institution's node key pair (ECDSA P-384, OpenSSH); send the .pub file to the coordinator."""
    from runtime.keys import fingerprint, new_node_keys

    try:
        public = new_node_keys(directory / "node.key")
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
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
    from client.deployment import node_config, node_config_arg, supernode_argv, trainer_argv
    from client.institution import deployed_policy
    from client.trainer import SOCKET_KEY, TrainerError, socket_dir, wait_ready

    try:
        for path, what in ((ca, "--ca"), (key, "--key")):
            if not path.is_file():
                raise FedsiloError(f"{what} {path}: no such file")
        limits = deployed_policy({"policy-path": str(policy)})
        summary = check_table(
            data, Schema.load(schema), batch_size=DEFAULTS.train.batch_size, delta=limits.accounting_delta(DEFAULTS)
        )
    except FedsiloError as err:
        print_error(console, err)
        console.print("the SuperNode was not started")
        raise typer.Exit(2) from None
    state_dir.mkdir(parents=True, exist_ok=True)
    if policy.resolve() != (state_dir / "policy.toml").resolve():
        shutil.copyfile(policy, state_dir / "policy.toml")  # what `budget` reads by default
    who = name or state_dir.resolve().name
    console.print(f"{summary.path}: {summary.rows} records fit the schema")
    console.print(f"policy: {limits.to_mapping()}")
    # The SuperNode enforces the copy in the state directory, which `budget` also reads.
    config = node_config(name=who, data=data, schema=schema, policy=state_dir / "policy.toml", state_dir=state_dir)

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # before anything starts: it is always stopped with us
    # The warm trainer holds torch and the records, so that each round's fit and evaluate
    # do not start from a cold process (see client/trainer.py).
    private = socket_dir()
    socket_path = private / "trainer.sock"
    trainer = (
        subprocess.Popen(trainer_argv(socket_path=socket_path, config=config), cwd=state_dir) if warm_trainer else None
    )
    try:
        if trainer is not None:
            try:
                wait_ready(socket_path, trainer)
            except TrainerError as err:
                print_error(console, err)
                raise typer.Exit(1) from None
            config = {**config, SOCKET_KEY: str(socket_path)}
        argv = supernode_argv(server=server, ca=ca, key=key, config=node_config_arg(config), port=port)
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        _run_supernode(argv, who=who, server=server, state_dir=state_dir, once=max_retries is not None)
    finally:
        if trainer is not None:
            stop_process(trainer)
        shutil.rmtree(private, ignore_errors=True)


def _run_supernode(argv: list[str], *, who: str, server: str, state_dir: Path, once: bool) -> None:
    """Run the SuperNode until it stops or we are interrupted; retry one the SuperLink refused at once."""
    console.print(f"{who}: SuperNode connecting to {server} over TLS; stop with Ctrl-C")
    code = 0
    for attempt in range(1 if once else ACTIVATION_ATTEMPTS):
        started = time.monotonic()
        process = subprocess.Popen(argv, env=flower_env(state_dir / "flwr"), cwd=state_dir)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            code = 0
        finally:
            stop_process(process)
        # Right after this node stopped, or after the SuperLink restarted, the SuperLink may
        # still hold the node's previous session and refuse to activate it for a while.
        if code == 0 or time.monotonic() - started > ACTIVATION_WINDOW_S or attempt == ACTIVATION_ATTEMPTS - 1:
            break
        console.print(f"{who}: the SuperNode stopped at once (code {code}); trying again in {ACTIVATION_PAUSE_S} s")
        time.sleep(ACTIVATION_PAUSE_S)
    if code:
        print_error(console, f"the SuperNode exited with code {code}")
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
