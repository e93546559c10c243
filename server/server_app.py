"""fedsilo ServerApp: weighted FedAvg through Flower's SecAgg+ workflow (legacy API)."""

from __future__ import annotations

import random
import time
from datetime import datetime
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from common.datasets import builtin_schema_path
from common.models import build_mlp, get_weights
from common.schema import Schema
from common.settings import RunSettings
from server.run_directory import RunDirectory
from server.secure_aggregation import GuardedSecAggPlusWorkflow
from server.strategy import FedsiloStrategy, RoundCallback


def resolve_run_dir(settings: RunSettings) -> Path:
    """The run directory: ``out-dir``, or ``runs/<time>-<dataset>`` in the working directory."""
    if settings.out_dir:
        return Path(settings.out_dir).resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path("runs") / f"{stamp}-{settings.data.dataset}").resolve()


def open_run(
    settings: RunSettings, on_round: RoundCallback | None = None, strategy_cls: type[FedsiloStrategy] = FedsiloStrategy
) -> tuple[RunSettings, RunDirectory, FedsiloStrategy]:
    """Resolve the run directory, build the initial model and the strategy (both engines start here)."""
    run_dir = resolve_run_dir(settings)
    settings = settings.with_overrides(
        {"out-dir": str(run_dir), "state-root": settings.state_root or str(run_dir / "state")}
    )
    schema_path = builtin_schema_path(settings.data.dataset)
    schema = Schema.load(schema_path)
    model = build_mlp(schema.num_inputs, schema.num_classes, settings.train.hidden_units, seed=settings.seed)
    spec = {
        "kind": "mlp",
        "num_inputs": schema.num_inputs,
        "num_classes": schema.num_classes,
        "classes": list(schema.classes),
        "hidden_layers": list(settings.train.hidden_units),
        "keys": list(model.state_dict().keys()),
    }
    directory = RunDirectory(run_dir, settings, spec, schema_path)
    round_config = {**settings.to_config(), "run-name": run_dir.name}
    strategy = strategy_cls(settings, directory, ndarrays_to_parameters(get_weights(model)), round_config, on_round)
    return settings, directory, strategy


def build_server_app(
    on_round: RoundCallback | None = None, strategy_cls: type[FedsiloStrategy] = FedsiloStrategy
) -> ServerApp:
    """A ServerApp; ``on_round`` receives each round's metrics row (for CLIs and tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = RunSettings.from_config(context.run_config)
        random.seed(settings.seed)  # Flower samples clients with the global generator
        settings, directory, strategy = open_run(settings, on_round, strategy_cls)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
        fit_workflow = (
            GuardedSecAggPlusWorkflow(**settings.secagg.workflow_kwargs()) if settings.secagg.enabled else None
        )
        log(INFO, "[fedsilo] run directory %s (secure aggregation %s)", directory.path, settings.secagg.enabled)
        started = time.monotonic()
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        directory.finish(strategy.current, time.monotonic() - started)

    return app


app = build_server_app()
