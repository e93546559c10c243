"""fedsilo ServerApp: weighted FedAvg through Flower's SecAgg+ workflow (legacy API)."""

from __future__ import annotations

import random
import time
from dataclasses import replace
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.serverapp import Grid

from fedsilo.common.aggregation import aggregation_for
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.errors import ConfigError
from fedsilo.common.models import build_model, get_weights, model_spec
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.runtime.flower.internals import InMemoryGrid
from fedsilo.runtime.flower.polling import cap_grid_polling
from fedsilo.runtime.flower.workflow import ResumableWorkflow
from fedsilo.server.coordinator import Coordinator, RoundCallback
from fedsilo.server.run_directory import RunDirectory
from fedsilo.server.run_naming import new_run_dir
from fedsilo.server.secure_aggregation import GuardedSecAggPlusWorkflow
from fedsilo.server.strategy import FedsiloStrategy


def resolve_run_dir(settings: RunSettings) -> Path:
    """The run directory: the one resumed, ``out-dir``, or ``runs/<time>-<dataset>`` in the working directory."""
    if settings.resume_from:
        return Path(settings.resume_from).resolve()
    if settings.out_dir:
        return Path(settings.out_dir).resolve()
    return new_run_dir(Path("runs"), dataset=settings.data.dataset).resolve()


def simulation_state(settings: RunSettings) -> RunSettings:
    """A simulation's settings with the run directory fixed and the simulated institutions' state in it.

    The researcher plays every institution, so they keep their ledgers under the run
    directory (``<run>/state``) unless ``state-root`` says where; a deployment never
    gets here, and its institutions choose their own state directories.
    """
    if settings.state_root:
        return settings
    run_dir = resolve_run_dir(settings)
    return replace(settings, out_dir=str(run_dir), state_root=str(run_dir / "state"))


def with_schema_fingerprint(settings: RunSettings, schema: Schema, schema_path: Path) -> RunSettings:
    """The settings with the federation schema's fingerprint in the proposal, so each institution can check its own.

    A proposal that already names another fingerprint (a resumed run whose schema file
    has changed since, or a ``--config`` that does not match the schema) is refused.
    """
    actual = schema.fingerprint()
    proposed = settings.data.schema_fingerprint
    if proposed and proposed != actual:
        raise ConfigError(
            f"'schema-fingerprint' is {proposed}, but the federation schema {schema_path} has fingerprint {actual}: "
            "the schema changed since the run started, or the setting is stale; restore the schema or drop the setting"
        )
    return replace(settings, data=replace(settings.data, schema_fingerprint=actual))


def open_run(
    settings: RunSettings, on_round: RoundCallback | None = None, strategy_cls: type[FedsiloStrategy] = FedsiloStrategy
) -> tuple[RunSettings, Coordinator, FedsiloStrategy]:
    """Resolve the run directory, build the initial model, the coordinator and the strategy (both engines start here).

    The in-process engine takes the round's config and sample sizes from the
    strategy (FedAvg's) and hands the replies to the coordinator, as the strategy does.
    """
    run_dir = resolve_run_dir(settings)
    settings = replace(settings, out_dir=str(run_dir))
    schema_path = Path(settings.schema_path) if settings.schema_path else builtin_schema_path(settings.data.dataset)
    schema = Schema.load(schema_path)
    settings = with_schema_fingerprint(settings, schema, schema_path)
    model = build_model(settings.train, schema, seed=settings.seed)
    directory = RunDirectory(run_dir, settings, model_spec(settings.train, schema, model), schema_path)
    weights = directory.last_checkpoint() or get_weights(model)
    coordinator = Coordinator(directory, aggregation_for(settings), weights, on_round=on_round)
    round_config = {**settings.institution_config(), "run-name": run_dir.name}  # the ledgers' run id, kept on resume
    return settings, coordinator, strategy_cls(settings, coordinator, round_config)


def build_server_app(
    on_round: RoundCallback | None = None, strategy_cls: type[FedsiloStrategy] = FedsiloStrategy
) -> ServerApp:
    """A ServerApp; ``on_round`` receives each round's metrics row (for CLIs and tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cap_grid_polling()  # deployed, Flower waits 3 s between asks for the institutions' replies
        settings = RunSettings.from_config(context.run_config)
        if settings.resume_from:  # the stopped run's own settings, whatever the run config says
            settings = RunDirectory.saved_settings(Path(settings.resume_from).resolve())
        if isinstance(grid, InMemoryGrid):  # Flower's simulation engine (also `flwr run .`)
            settings = simulation_state(settings)
        random.seed(settings.seed)  # Flower samples clients with the global generator
        settings, coordinator, strategy = open_run(settings, on_round, strategy_cls)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
        fit_workflow = (
            GuardedSecAggPlusWorkflow(
                sample_size=lambda: strategy.fit_sample_size(legacy.client_manager),
                on_halt=strategy.fit_halted,
                warn_clipping=not settings.distributed,
                **settings.secagg.workflow_kwargs(),
            )
            if settings.secagg.enabled
            else None
        )
        directory = coordinator.run_dir
        first_round = directory.last_round + 1
        log(INFO, "[fedsilo] run directory %s, rounds %s to %s", directory.path, first_round, settings.rounds)
        started = time.monotonic()
        ResumableWorkflow(fit_workflow, first_round=first_round, reply_timeout=settings.secagg.timeout)(grid, legacy)
        coordinator.finish(time.monotonic() - started)

    return app


app = build_server_app()
