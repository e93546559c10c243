"""fedsilo-server: the coordinator's tools; they parse options and delegate (server.federation, .processes)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedsilo.common.cli import exit_on_error, institutions_table, print_error
from fedsilo.common.errors import ConfigError, FedsiloError
from fedsilo.common.tomlfile import parse_assignments
from fedsilo.runtime.keys import DEFAULT_HOSTS
from fedsilo.server import processes
from fedsilo.server.federation import DEFAULT_PORT, Federation
from fedsilo.server.outcome import untrained_reason

app = typer.Typer(help="fedsilo for coordinators.", no_args_is_help=True)
console = Console(soft_wrap=True)


@app.callback()
def _main() -> None:
    """fedsilo for coordinators."""


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (holds report.json).")]) -> None:
    """Summarise a finished run: accuracy and each institution's privacy."""
    path = run_dir / "report.json"
    with exit_on_error(console):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
    table = institutions_table(data)
    table.title = f"{run_dir}: {data['rounds_completed']} rounds, secure aggregation {data['secure_aggregation']}"
    console.print(table)
    console.print(f"final metrics: {data['final_metrics']}")


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The new federation directory.")],
    host: Annotated[
        list[str] | None, typer.Option(help="Host name or IP the server certificate covers (repeat).")
    ] = None,
    dataset: Annotated[str, typer.Option(help="Built-in dataset whose schema to use.")] = "breast-cancer",
    schema: Annotated[Path | None, typer.Option(help="The federation schema (TOML), instead of --dataset's.")] = None,
    port: Annotated[int, typer.Option(help="Port the SuperLink will listen on.")] = DEFAULT_PORT,
) -> None:
    """Create a federation: a CA, a server certificate, the schema and the run settings."""
    hosts = tuple(host) if host else DEFAULT_HOSTS
    with exit_on_error(console):
        fed = Federation.init(directory, hosts=hosts, dataset=dataset, schema=schema, port=port)
    console.print(f"federation created in {fed.root}")
    console.print(f"  server certificate for: {', '.join(hosts)}")
    console.print(f"  send to every institution: {fed.ca_cert} and {fed.schema_path}")
    console.print(f"  run settings: {fed.config_path} (its \\[run] table)")
    console.print(f"next: `fedsilo-server admit {directory} NODE_KEY.pub --name NAME` for each institution")


@app.command()
def admit(
    directory: Annotated[Path, typer.Argument(help="The federation directory.")],
    public_key: Annotated[Path, typer.Argument(help="The institution's node public key (.pub).")],
    name: Annotated[str, typer.Option(help="The institution's name.")],
) -> None:
    """Admit an institution's node key (registered with the SuperLink now, or when it starts)."""
    with exit_on_error(console):
        entry, live = processes.admit(Federation(directory), public_key, name)
    console.print(f"admitted {entry.name}: {entry.fingerprint} (check it with the institution)")
    console.print("registered with the running SuperLink" if live else "it is registered when the SuperLink starts")


@app.command()
def start(
    directory: Annotated[Path, typer.Argument(help="The federation directory.")],
    port: Annotated[int | None, typer.Option(help="Port (default: federation.toml's).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (only this one).")] = "127.0.0.1",
    insecure: Annotated[bool, typer.Option(help="No TLS, no node authentication: local experiments only.")] = False,
) -> None:
    """Run the SuperLink with TLS and SuperNode authentication until interrupted."""
    fed = Federation(directory)
    if insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS and no node authentication. Updates, keys and metrics "
            "cross the network in the clear and anyone can join. Never use this with real data.[/bold red]"
        )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # before the SuperLink starts: it is always stopped with us
    with exit_on_error(console):
        chosen = port or fed.port
        running = processes.start_superlink(fed, host=host, port=chosen, insecure=insecure)
    mode = "INSECURE" if insecure else "TLS, node authentication"
    console.print(f"Fleet API on {host}:{chosen} ({mode}); the Control API listens on loopback only")
    console.print(f"admitted institutions: {', '.join(sorted(fed.institutions())) or 'none yet'}")
    if running.stopped_runs:
        console.print(f"stopped Flower run(s) {', '.join(running.stopped_runs)} left over from before the restart")
    console.print(f"log: {fed.superlink_dir / 'superlink.log'}; stop with Ctrl-C")
    try:
        while (gone := running.exited()) is None:
            time.sleep(0.5)
        print_error(console, f"the {gone[0]} exited with code {gone[1]}; see {fed.superlink_dir / 'superlink.log'}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping the SuperLink")
    finally:
        processes.stop_superlink(running, fed)


@app.command()
def run(
    directory: Annotated[Path, typer.Argument(help="The federation directory.")],
    rounds: Annotated[int | None, typer.Option(help="Rounds (default: federation.toml's).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per institution over the run.")] = None,
    min_institutions: Annotated[
        int | None, typer.Option(help="Institutions every round waits for (default: all admitted).")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(help="More run settings, as 'key=value key2=value2' (the option may be repeated)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the last unfinished run from its last round.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show all of Flower's log.")] = False,
) -> None:
    """Submit a run to the SuperLink, stream its progress and write its run directory under DIR/runs."""
    fed = Federation(directory)
    with exit_on_error(console):
        if resume:
            if config or rounds is not None or epsilon is not None or min_institutions is not None:
                raise FedsiloError("a resumed run keeps the settings it started with; --resume takes no other option")
            settings = fed.resumed_run()
        else:
            overrides = parse_assignments(" ".join(config or []), "--config")
            settings = fed.new_run(overrides, rounds=rounds, epsilon=epsilon, min_institutions=min_institutions)
    run_dir = Path(settings.resume_from or settings.out_dir)
    with exit_on_error(console), processes.run_slot(fed):
        fed.write_app(settings)
        processes.record_admitted(fed, run_dir)
        console.print(f"{'resuming' if resume else 'starting'} run {run_dir.name} ({run_dir})")
        try:
            processes.drive_run(fed, verbose=verbose, say=console.print, warn=lambda text: print_error(console, text))
        except KeyboardInterrupt:
            print_error(
                console, f"interrupted; `fedsilo-server run {directory} --resume` continues from the last round"
            )
            raise typer.Exit(130) from None
    conclude(run_dir)


def conclude(run_dir: Path) -> None:
    """Summarise a run that has ended; exit 1 when it wrote no report or trained nothing."""
    path = run_dir / "report.json"
    if not path.exists():
        print_error(console, f"the run ended without writing {path}; rerun with --verbose")
        raise typer.Exit(1)
    report(run_dir)
    if (problem := untrained_reason(json.loads(path.read_text(encoding="utf-8")), run_dir)) is not None:
        print_error(console, problem)
        raise typer.Exit(1)


@app.command()
def stop(directory: Annotated[Path, typer.Argument(help="The federation directory.")]) -> None:
    """Stop every run that is active on the federation's SuperLink (a completed round stays resumable)."""
    fed = Federation(directory)
    with exit_on_error(console):
        fed.load()
        if processes.running_address(fed) is None:
            raise FedsiloError(f"no SuperLink is running for {fed.root}")
        active = processes.active_runs(fed)
        for run_id in active:
            processes.stop_run(fed, run_id)
    console.print(f"stopped Flower run(s) {', '.join(active)}" if active else "no active run")


@app.command()
def status(directory: Annotated[Path, typer.Argument(help="The federation directory.")]) -> None:
    """SuperLink health, admitted and connected institutions, and runs."""
    fed = Federation(directory)
    with exit_on_error(console):
        fed.load()
    address = processes.running_address(fed)
    info = json.loads((fed.superlink_dir / "superlink.json").read_text()) if address else {}
    up = address is not None and processes.healthy(address, None if info.get("insecure") else fed.ca_cert)
    public = str(info.get("public", address))
    if up:
        console.print(f"SuperLink: healthy; institutions connect to {public} (Fleet API only; control on {address})")
    else:
        console.print("SuperLink: not running")
    nodes: list[dict[str, Any]] = []
    if up:
        try:
            nodes = list(processes.flwr_json(fed, "supernode", "ls", "fedsilo").get("nodes", []))
        except FedsiloError as err:
            print_error(console, err)
    names = processes.node_names(fed)
    online = {names.get(str(n.get("node-id")), str(n.get("node-id"))): str(n.get("status", "?")) for n in nodes}
    table = Table(title="Institutions")
    for column in ("name", "fingerprint", "admitted", "status"):
        table.add_column(column)
    for name, inst in sorted(fed.institutions().items()):
        table.add_row(name, inst.fingerprint, inst.admitted_at, online.get(name, "offline" if up else "-"))
    console.print(table)
    runs = Table(title="Runs")
    for column in ("run", "rounds", "state"):
        runs.add_column(column)
    for name, rounds, state in fed.runs():
        runs.add_row(name, str(rounds), state)
    console.print(runs)


def main() -> None:  # pragma: no cover - console-script entry point
    app()
