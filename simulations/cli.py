"""fedsilo-simulate: run whole federations on one machine."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedsilo.common.cli import exit_on_error, fmt, institutions_table, print_error
from fedsilo.common.errors import FedsiloError
from fedsilo.common.registry import DATASETS
from fedsilo.common.settings import Proposal, RunSettings
from fedsilo.server.outcome import untrained_reason
from fedsilo.server.run_naming import new_run_dir

app = typer.Typer(help="Simulate fedsilo federations on one machine (Flower simulation engine).", no_args_is_help=True)
console = Console(soft_wrap=True)
DEFAULTS = Proposal()


@app.callback()
def _main() -> None:
    """Simulate fedsilo federations on one machine."""


@app.command()
def run(
    dataset: Annotated[
        str, typer.Option(help=f"Built-in dataset ({', '.join(sorted(DATASETS))}) or a CSV/Parquet file.")
    ] = DEFAULTS.data.dataset,
    schema: Annotated[Path | None, typer.Option(help="The schema (TOML) of a CSV/Parquet --dataset.")] = None,
    institutions: Annotated[int, typer.Option(help="Number of institutions (default: 4 hospitals, 3 banks).")] = 0,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = DEFAULTS.rounds,
    epsilon: Annotated[
        float, typer.Option(help="Target epsilon over all rounds per institution ('inf': no DP).")
    ] = DEFAULTS.privacy.target_epsilon,
    noise_multiplier: Annotated[
        float, typer.Option(help="Fixed noise multiplier (overrides --epsilon when > 0).")
    ] = DEFAULTS.privacy.noise_multiplier,
    delta: Annotated[float, typer.Option(help="Delta of (epsilon, delta)-DP.")] = DEFAULTS.privacy.delta,
    max_epsilon: Annotated[
        float, typer.Option(help="Lifetime epsilon budget per dataset (0: the target).")
    ] = DEFAULTS.privacy.max_epsilon,
    accountant: Annotated[
        str, typer.Option(help="pld (dp-accounting's PLD, the accountant of record) or rdp (Opacus's RDP).")
    ] = DEFAULTS.privacy.accountant,
    partition: Annotated[str, typer.Option(help="iid, dirichlet:ALPHA or column:NAME.")] = DEFAULTS.data.partition,
    secure_aggregation: Annotated[
        bool, typer.Option("--secure-aggregation/--no-secure-aggregation", help="SecAgg+ (on by default).")
    ] = DEFAULTS.secagg.enabled,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = DEFAULTS.train.local_epochs,
    batch_size: Annotated[
        int, typer.Option(help="Expected batch size (Poisson sampling); 0: the recipe's (n / 16 in [32, 1024]).")
    ] = DEFAULTS.train.batch_size,
    learning_rate: Annotated[
        float, typer.Option(help="SGD learning rate; 0: the recipe's (a noise-aware travel budget).")
    ] = DEFAULTS.train.learning_rate,
    model: Annotated[
        str,
        typer.Option(help="linear (logistic/softmax regression, any schema), mlp (any schema) or cnn (28x28 images)."),
    ] = DEFAULTS.train.model,
    activation: Annotated[
        str, typer.Option(help="relu, or tanh (the tempered sigmoid that suits DP-SGD).")
    ] = DEFAULTS.train.activation,
    seed: Annotated[int, typer.Option(help="Seed of every random source.")] = DEFAULTS.seed,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<time>-<dataset>).")] = None,
    state_root: Annotated[
        Path | None, typer.Option(help="Institutions' state (ledgers); reuse it to continue their budgets.")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(help="Institutions' privacy policy (TOML; [institutions.NAME] tables for one institution)."),
    ] = None,
    engine: Annotated[
        str, typer.Option(help="flower: Flower's simulation runtime with full SecAgg+; inprocess: the fast path.")
    ] = "flower",
    ray_address: Annotated[
        str,
        typer.Option(help="Run Flower's simulation engine on this existing Ray cluster (ray start), e.g. HOST:6379."),
    ] = "",
    tensorboard: Annotated[
        Path | None, typer.Option(help="Write each round's metrics and epsilon as TensorBoard event files here.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run one federation and write its run directory (metrics.csv, model.pt, report.json)."""
    # Imported here, not at the top: they load torch, which `--help` and `sweep` need not wait for.
    from fedsilo.simulations.engines import run_engine
    from fedsilo.simulations.plan import check_simulation, check_where, dataset_value, default_institutions

    count = institutions or default_institutions(dataset)
    with exit_on_error(console):
        proposal = replace(
            DEFAULTS,
            rounds=rounds,
            seed=seed,
            train=replace(
                DEFAULTS.train,
                local_epochs=local_epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                model=model,
                activation=activation,
            ),
            privacy=replace(
                DEFAULTS.privacy,
                target_epsilon=epsilon,
                noise_multiplier=noise_multiplier,
                delta=delta,
                max_epsilon=max_epsilon,
                accountant=accountant,
            ),
            secagg=replace(DEFAULTS.secagg, enabled=secure_aggregation),
            data=replace(DEFAULTS.data, dataset=dataset_value(dataset), partition=partition),
        )
        settings = RunSettings.of(
            proposal,
            out_dir=str((out or new_run_dir(Path("runs"), dataset=dataset)).resolve()),
            schema_path=str(schema.resolve()) if schema else "",
            state_root=str(state_root.resolve()) if state_root else "",
            simulation_policy=str(policy.resolve()) if policy else "",
        )
        checked = check_simulation(settings, count)
        check_where(engine, ray_address)
        if ray_address:
            from fedsilo.simulations.cluster import check_reachable

            check_reachable(ray_address)
        tracker = None
        if tensorboard is not None:
            from fedsilo.simulations.tracking import RunTracker

            tracker = RunTracker(tensorboard)
    out_dir = Path(settings.out_dir)
    privacy = "no DP" if not settings.privacy.enabled else f"target epsilon {fmt(epsilon, 2)}, delta {delta:g}"
    console.print(
        f"fedsilo: {count} institutions on {dataset} ({partition}), {rounds} rounds, {privacy}, "
        f"secure aggregation {'on (SecAgg+)' if secure_aggregation else 'off'}"
    )
    if engine == "flower":
        where = f"on the Ray cluster at {ray_address}" if ray_address else "(about 10 s)"
        console.print(f"starting Flower's simulation engine {where} ...")
    started = time.monotonic()

    def progress(row: dict[str, Any]) -> None:
        console.print(
            f"round {row['round']:>3}/{rounds}  {_scores(row, checked.lead)}  "
            f"max epsilon {fmt(row['max_epsilon'], 3)}  trained {row['institutions_trained']}  "
            f"refused {row['institutions_refused']}  ({row['elapsed_s']:.1f} s)"
        )
        if tracker is not None:
            tracker.round(row)

    try:
        with exit_on_error(console):
            report = run_engine(
                engine, settings, institutions=count, on_round=progress, verbose=verbose, ray_address=ray_address
            )
    finally:
        if tracker is not None:
            tracker.close()
    if tensorboard is not None:
        console.print(f"TensorBoard event files: {tensorboard} (tensorboard --logdir {tensorboard})")
    _summary(report, time.monotonic() - started, out_dir, checked.lead, checked.majority)


def _comma_list(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def sweep(
    file: Annotated[Path | None, typer.Option("--file", help="A TOML sweep file (options below override it).")] = None,
    dataset: Annotated[
        str | None, typer.Option(help=f"Built-in dataset ({', '.join(sorted(DATASETS))}) or a CSV/Parquet file.")
    ] = None,
    schema: Annotated[Path | None, typer.Option(help="The schema (TOML) of a CSV/Parquet --dataset.")] = None,
    epsilons: Annotated[str | None, typer.Option(help="Target epsilons, e.g. 0.5,1,2,4,8,inf.")] = None,
    noise_multipliers: Annotated[str | None, typer.Option(help="Fixed noise multipliers, e.g. 0.8,1.2.")] = None,
    institutions: Annotated[str | None, typer.Option(help="Federation sizes, e.g. 4 or 3,6.")] = None,
    partitions: Annotated[str | None, typer.Option(help="e.g. iid,dirichlet:0.5,column:NAME.")] = None,
    secure_aggregation: Annotated[str | None, typer.Option(help="on, off or on,off.")] = None,
    local_epochs: Annotated[str | None, typer.Option(help="Local epochs per round, e.g. 1,2.")] = None,
    dp_modes: Annotated[
        str | None, typer.Option(help="DP modes, e.g. local,distributed (distributed: SecAgg+ setups only).")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds, e.g. 0,1,2.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds (default 20).")] = None,
    delta: Annotated[float | None, typer.Option(help="Delta of (epsilon, delta)-DP (default 1e-5).")] = None,
    engine: Annotated[str | None, typer.Option(help="inprocess (default) or flower.")] = None,
    jobs: Annotated[int, typer.Option(help="Worker processes (in-process engine; 0: one per core).")] = 0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Run each federation as a Ray task on this existing cluster (ray start ...), e.g. HOST:6379."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Results directory (default: runs/sweep-<time>); an interrupted sweep's: resume it."),
    ] = None,
    tensorboard: Annotated[
        Path | None,
        typer.Option(help="Write each federation's rounds and scores, and the summary, as TensorBoard event files."),
    ] = None,
) -> None:
    """Sweep privacy and federation settings with baselines and a privacy audit; write tables, plots, report."""
    from fedsilo.simulations.plan import dataset_value
    from fedsilo.simulations.sweep import check_sweep
    from fedsilo.simulations.sweep_spec import load_sweep_file, parse_sweep
    from fedsilo.simulations.sweep_store import SweepStore

    cli_values = {
        "dataset": dataset_value(dataset) if dataset else None,
        "epsilons": _comma_list(epsilons),
        "noise-multipliers": _comma_list(noise_multipliers),
        "institutions": _comma_list(institutions),
        "partitions": _comma_list(partitions),
        "secure-aggregation": _comma_list(secure_aggregation),
        "local-epochs": _comma_list(local_epochs),
        "dp-modes": _comma_list(dp_modes),
        "seeds": _comma_list(seeds),
        "rounds": rounds,
        "delta": delta,
        "engine": engine,
        "ray-address": ray_address,
    }
    given = {k: v for k, v in cli_values.items() if v is not None}
    out_dir = out or new_run_dir(Path("runs"), prefix="sweep")
    with exit_on_error(console):
        raw = load_sweep_file(file) if file else {}
        if schema is not None:
            raw["schema"] = str(schema.resolve())
        source = str(file) if file and not given else f"{file} and the command line" if file else "command line"
        spec = parse_sweep({**raw, **given}, source, folder=file.parent if file else None)
        check_sweep(spec)
        if SweepStore.holds_sweep(out_dir):
            SweepStore.open(out_dir, spec)  # the same spec, or an error naming what differs
        elif out_dir.exists() and any(out_dir.iterdir()):
            raise FedsiloError(f"{out_dir} already exists and is not empty; choose another --out or remove it")
        if jobs < 0:
            raise FedsiloError(f"--jobs must be >= 0 (0: one per core). Found {jobs}.")
        if spec.ray_address:
            from fedsilo.simulations.cluster import check_reachable

            check_reachable(spec.ray_address)
        tracker = None
        if tensorboard is not None:
            from fedsilo.simulations.tracking import SweepTracker

            tracker = SweepTracker(tensorboard)
    workers = jobs or os.cpu_count() or 1
    _run_sweep_cli(spec, out_dir, workers, tracker)


def _run_sweep_cli(spec: Any, out_dir: Path, workers: int, tracker: Any = None) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fedsilo.common.metrics import LABELS as METRIC_LABELS
    from fedsilo.simulations.report import lead_explanation, tradeoff_table, write_report, write_tables
    from fedsilo.simulations.sweep import run_sweep, status_messages, sweep_lead_metric
    from fedsilo.simulations.sweep_store import SweepStore

    tasks = spec.tasks()
    where = f"Ray cluster {spec.ray_address}" if spec.ray_address else f"{spec.engine} engine"
    console.print(
        f"fedsilo sweep: {spec.dataset}, {len(spec.setups)} setup(s) x {len(spec.levels)} privacy levels x "
        f"{len(spec.seeds)} seeds = {len(tasks)} federations (+ pooled, alone and reference baselines), "
        f"{spec.rounds} rounds, {where}"
        + ("" if spec.ray_address else f", {workers if spec.engine == 'inprocess' else 1} worker(s)")
    )
    ids = {task.run_id for task in tasks}
    finished = len(ids & set(SweepStore(out_dir).finished()))
    if finished:
        console.print(f"resuming {out_dir}: {finished} of {len(tasks)} federations already finished, skipped")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with (
            exit_on_error(console),
            Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
            ) as progress,
        ):
            bar = progress.add_task("sweep", total=len(tasks), completed=finished)
            track = (lambda _, r: tracker.task(r.run_id, r.rounds, r.results)) if tracker is not None else None
            tables = run_sweep(spec, out_dir, jobs=workers, on_done=lambda _: progress.advance(bar), on_record=track)
    except KeyboardInterrupt:
        kept = len(ids & set(SweepStore(out_dir).finished()))
        console.print(
            f"interrupted: {kept} of {len(tasks)} federations finished and are kept in {out_dir / 'tasks'}; "
            "run the same command again to resume"
        )
        raise typer.Exit(130) from None
    wall = time.monotonic() - started
    failures = tables["failures"]
    for row in failures.itertuples(index=False):
        print_error(console, f"federation {row.run_id} failed: {row.error}")
    if tables["results"].empty:
        console.print(f"no federation finished; the errors are in {out_dir / 'failures'} (exit 1)")
        raise typer.Exit(1)
    notes = [
        f"dataset {spec.dataset}; {spec.rounds} rounds; delta {spec.delta:g}; seeds {list(spec.seeds)}; "
        f"{spec.engine} engine",
        f"wall time {wall:.1f} s for {len(tasks) - finished} tasks ({finished} resumed) on {where} with "
        + (f"{workers} worker(s) on {os.cpu_count()} cores " if not spec.ray_address else "")
        + f"({platform.machine()}, {platform.system()})",
    ]
    if len(failures):
        notes.append(f"{len(failures)} federation(s) failed and are missing (failures.csv): rerun to retry them")
    with exit_on_error(console):
        write_tables(tables, out_dir)
        write_report(tables, out_dir, title=f"fedsilo sweep: {spec.dataset}", notes=notes)
        if tracker is not None:
            from fedsilo.simulations.sweep import summary_table

            tracker.summary(summary_table(tables["results"]), sweep_lead_metric(tables["results"]))
            console.print(f"TensorBoard event files: {tracker.log_dir} (tensorboard --logdir {tracker.log_dir})")
    results = tables["results"]
    metric = sweep_lead_metric(results)
    table = tradeoff_table(results)
    if len(spec.setups) == 1:  # one setup: its columns say nothing
        table = table.drop(columns=["institutions", "partition", "secure_aggregation", "local_epochs", "dp_mode"])
    rich_table = Table(title=f"{METRIC_LABELS[metric]} on the held-out records (mean ± std over seeds)")
    for column in table.columns:
        rich_table.add_column(str(column), justify="right")
    for row in table.itertuples(index=False):
        rich_table.add_row(*[escape(str(v)) for v in row])
    console.print(rich_table)
    console.print(lead_explanation(results, metric), highlight=False)
    warned, errors = status_messages(results)
    for text in warned:
        console.print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)
    console.print(f"sweep finished in {wall:.1f} s; report: {out_dir / 'report.html'}")
    for text in errors:
        print_error(console, text)
    if errors:
        console.print(f"{len(errors)} federation(s) never trained; everything else is written (exit 1)")
    if len(failures):
        console.print(
            f"{len(failures)} federation(s) failed (failures.csv); the others' results are written; "
            "run the same command again to retry them (exit 1)"
        )
    if errors or len(failures):
        raise typer.Exit(1)


SHORT = {"auc": "AUC", "average_precision": "AP", "balanced_accuracy": "bal. accuracy", "accuracy": "accuracy"}


def _scores(row: dict[str, Any], lead: str) -> str:
    """A round's scores, the lead metric first (for two classes: AUC, AP, balanced accuracy, accuracy)."""
    shown = tuple(SHORT) if lead == "auc" else ("balanced_accuracy", "accuracy")  # AUC and AP: two classes only
    keys = [lead, *(k for k in shown if k != lead)]
    return "  ".join(f"{SHORT[k]} {fmt(row.get(k))}" for k in keys)


def _summary(report: dict[str, Any], wall_s: float, out_dir: Path, lead: str, majority: float) -> None:
    console.print(institutions_table(report))
    final = report["final_metrics"]
    refused = sum(int(r["institutions_refused"]) for r in report["rounds"])
    asked = refused + sum(int(r["institutions_trained"]) for r in report["rounds"])
    problem = untrained_reason(report, out_dir)
    untrained = problem is not None
    console.print(
        f"{'untrained initial model (no round aggregated):' if untrained else 'final'} {_scores(final, lead)} "
        f"(always guessing the majority class: accuracy {majority:.4f}), "
        f"max epsilon {fmt(report['max_epsilon'], 3)}, {report['rounds_completed']} rounds, "
        f"secure aggregation {report['secure_aggregation']}, wall time {wall_s:.1f} s"
    )
    console.print(f"run directory: {out_dir}")
    if problem is not None:
        print_error(console, problem)
        raise typer.Exit(1)
    if refused:
        reasons = escape(str(out_dir / "report.json"))
        console.print(
            f"[bold yellow]warning:[/] {refused} of {asked} institution-rounds refused to train (reasons: {reasons})",
            highlight=False,
        )


def main() -> None:  # pragma: no cover - console-script entry point
    app()


if __name__ == "__main__":  # pragma: no cover - python -m fedsilo.simulations.cli
    main()
