"""fedsilo-server: the coordinator's tools."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from common.cli import print_error
from common.errors import FedsiloError
from common.settings import RunSettings
from runtime.keys import DEFAULT_HOSTS
from runtime.processes import executable, flower_env, stop_process
from server.federation import DEFAULT_PORT, MANAGED_KEYS, Federation

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
    for column in ("institution", "weight", "epsilon", "delta", "rounds trained", "refusals"):
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
    try:
        fed = Federation.init(directory, hosts=hosts, dataset=dataset, schema=schema, port=port)
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
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
    from server.deployment import register_admitted, running_address

    fed = Federation(directory)
    try:
        entry = fed.admit(public_key, name)
        live = running_address(fed) is not None
        if live:
            try:
                register_admitted(fed)
            except FedsiloError:
                fed.withdraw(name)  # not half admitted: the SuperLink would refuse it until a restart
                raise
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
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
    from server.deployment import start_superlink, stop_superlink

    fed = Federation(directory)
    if insecure:
        console.print(
            "[bold red]WARNING: --insecure: no TLS and no node authentication. Updates, keys and metrics "
            "cross the network in the clear and anyone can join. Never use this with real data.[/bold red]"
        )

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # before the SuperLink starts: it is always stopped with us
    try:
        fed.load()
        chosen = port or fed.port
        running = start_superlink(fed, host=host, port=chosen, insecure=insecure)
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
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
        stop_superlink(running, fed)


@app.command()
def run(
    directory: Annotated[Path, typer.Argument(help="The federation directory.")],
    rounds: Annotated[int | None, typer.Option(help="Rounds (default: federation.toml's).")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Target epsilon per institution over the run.")] = None,
    min_institutions: Annotated[
        int | None, typer.Option(help="Institutions every round waits for (default: all admitted).")
    ] = None,
    config: Annotated[str, typer.Option(help="More run settings, as 'key=value key2=value2'.")] = "",
    resume: Annotated[bool, typer.Option(help="Continue the last unfinished run from its last round.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show all of Flower's log.")] = False,
) -> None:
    """Submit a run to the SuperLink, stream its progress and write its run directory under DIR/runs."""
    from server.deployment import active_runs, require_admitted, run_lock, running_address

    fed = Federation(directory)
    held = contextlib.ExitStack()  # the federation's run lock, from the checks to the end of the run
    try:
        fed.load()
        require_admitted(fed)
        if running_address(fed) is None:
            raise FedsiloError(f"no SuperLink is running for {fed.root}; start it with `fedsilo-server start`")
        held.enter_context(run_lock(fed))
        overrides: dict[str, Any] = _parse_config(config)
        known = set(RunSettings().to_config())
        unknown, managed = sorted(set(overrides) - known), sorted(set(overrides) & set(MANAGED_KEYS))
        if unknown:
            raise FedsiloError(
                f"--config: unknown run setting(s) {unknown}; known: {sorted(known - set(MANAGED_KEYS))}"
            )
        if managed:
            raise FedsiloError(f"--config may not set {managed}: fedsilo-server chooses these paths")
        if rounds is not None:
            overrides["num-server-rounds"] = rounds
        if epsilon is not None:
            overrides["target-epsilon"] = epsilon
        if resume:
            if overrides or rounds is not None or epsilon is not None or min_institutions is not None:
                raise FedsiloError("a resumed run keeps the settings it started with; --resume takes no other option")
            run_dir = _unfinished_run(fed)
            overrides = {"resume-from": str(run_dir)}
        else:
            overrides["min-institutions"] = (
                min_institutions or overrides.get("min-institutions") or len(fed.institutions())
            )
            run_dir = fed.runs_dir / datetime.now().strftime("%Y%m%d-%H%M%S")
            overrides["out-dir"] = str(run_dir)
        fed.settings(overrides=overrides)  # every value checked before anything is submitted
        if active := active_runs(fed):
            raise FedsiloError(
                f"Flower run(s) {', '.join(active)} are still active on the SuperLink; a second run would "
                f"compete for the same institutions. Stop them with `fedsilo-server stop {directory}`"
            )
        fed.write_app()
    except FedsiloError as err:
        held.close()
        print_error(console, err)
        raise typer.Exit(2) from None
    try:
        with held:
            console.print(f"{'resuming' if resume else 'starting'} run {run_dir.name} ({run_dir})")
            _drive(fed, overrides, verbose=verbose)
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print_error(console, f"interrupted; `fedsilo-server run {directory} --resume` continues from the last round")
        raise typer.Exit(130) from None
    if not (run_dir / "report.json").exists():
        print_error(console, f"the run ended without writing {run_dir / 'report.json'}; rerun with --verbose")
        raise typer.Exit(1)
    report(run_dir)


def _drive(fed: Federation, overrides: dict[str, Any], *, verbose: bool) -> None:
    """Submit the run with ``flwr run --stream`` and show its progress; Ctrl-C stops the Flower run too."""
    import re

    from server.deployment import active_runs, stop_run

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    argv = [executable("flwr"), "run", str(fed.app_dir), "fedsilo", "--stream", "--run-config", _run_config(overrides)]
    run_id = None
    with subprocess.Popen(
        argv, cwd=fed.root, env=flower_env(fed.flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as flower:
        assert flower.stdout is not None
        try:
            shown = ""
            for line in flower.stdout:
                if run_id is None and (started := re.search(r"Successfully started run (\d+)", line)):
                    run_id = started.group(1)
                if verbose:
                    sys.stdout.write(line)
                elif "[fedsilo]" in line or "ERROR" in line:
                    text = line.split("[fedsilo] ")[-1]
                    if text != shown:  # Flower logs each line through two handlers
                        sys.stdout.write(text)
                    shown = text
                sys.stdout.flush()
        except KeyboardInterrupt:
            stop_process(flower, timeout=5)
            # The stream is only a view: the run itself goes on until stopped. A Ctrl-C can come
            # before the stream has shown the run's id; this command holds the federation's run
            # lock, so the runs active on the SuperLink then are its own.
            try:
                for active in [run_id] if run_id is not None else active_runs(fed):
                    stop_run(fed, active, timeout=60)
                    console.print(f"stopped Flower run {active}")
            except FedsiloError as err:
                print_error(console, err)
            raise


@app.command()
def stop(directory: Annotated[Path, typer.Argument(help="The federation directory.")]) -> None:
    """Stop every run that is active on the federation's SuperLink (a completed round stays resumable)."""
    from server.deployment import active_runs, running_address, stop_run

    fed = Federation(directory)
    try:
        fed.load()
        if running_address(fed) is None:
            raise FedsiloError(f"no SuperLink is running for {fed.root}")
        active = active_runs(fed)
        for run_id in active:
            stop_run(fed, run_id)
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    console.print(f"stopped Flower run(s) {', '.join(active)}" if active else "no active run")


@app.command()
def status(directory: Annotated[Path, typer.Argument(help="The federation directory.")]) -> None:
    """SuperLink health, admitted and connected institutions, and runs."""
    from server.deployment import flwr_json, healthy, node_names, running_address

    fed = Federation(directory)
    try:
        fed.load()
    except FedsiloError as err:
        print_error(console, err)
        raise typer.Exit(2) from None
    address = running_address(fed)
    info = json.loads((fed.superlink_dir / "superlink.json").read_text()) if address else {}
    up = address is not None and healthy(address, None if info.get("insecure") else fed.ca_cert)
    public = str(info.get("public", address))
    if up:
        console.print(f"SuperLink: healthy; institutions connect to {public} (Fleet API only; control on {address})")
    else:
        console.print("SuperLink: not running")
    nodes: list[dict[str, Any]] = []
    if up:
        try:
            nodes = list(flwr_json(fed, "supernode", "ls", "fedsilo").get("nodes", []))
        except FedsiloError as err:
            print_error(console, err)
    names = node_names(fed)
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
    for path in sorted(fed.runs_dir.glob("*")) if fed.runs_dir.exists() else []:
        state = "finished" if (path / "report.json").exists() else "stopped or running"
        metrics = path / "metrics.csv"
        rows = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.exists() else 0
        runs.add_row(path.name, str(rows), state)
    console.print(runs)


def _parse_config(text: str) -> dict[str, Any]:
    """'key=value ...' as TOML values (strings may be bare)."""
    import shlex
    import tomllib

    out: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedsiloError(f"--config: {item!r} is not key=value")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def _run_config(values: dict[str, Any]) -> str:
    from server.federation import toml_value

    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def _unfinished_run(fed: Federation) -> Path:
    candidates = [p for p in sorted(fed.runs_dir.glob("*")) if (p / "progress.json").exists()]
    if not candidates or (candidates[-1] / "report.json").exists():
        raise FedsiloError(f"no unfinished run under {fed.runs_dir} has a completed round to resume from")
    return candidates[-1]


def main() -> None:  # pragma: no cover - console-script entry point
    app()
