"""Run a fedsilo federation in Flower's simulation engine (Ray backend), in process.

This is what ``flwr run`` does for a local simulation (``flwr.simulation.app``
calls the same ``_run_simulation``, see ``fedsilo.runtime.flower.internals``), minus the SuperLink round trip: the run
config is handed to the ServerApp's context directly, and the ServerApp runs in
this process so a caller can follow the rounds.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedsilo.common.settings import RunSettings
from fedsilo.server.coordinator import RoundCallback
from fedsilo.server.server_app import simulation_state
from fedsilo.simulations.environment import contained_flower


def simulated(settings: RunSettings, institutions: int) -> RunSettings:
    """The settings a simulation of ``institutions`` runs with (both engines).

    Each round waits for every simulated institution (Flower registers nodes with the
    strategy in the background, and round 1 must not start with a subset), and the
    institutions keep their state under the run directory unless ``state_root`` says
    otherwise: it is what makes the run a simulation (``RunSettings.simulated``).
    """
    if not settings.out_dir:
        raise ValueError("settings.out_dir must name the run directory")
    return replace(simulation_state(settings), min_institutions=institutions)


def run_federation(
    settings: RunSettings,
    *,
    institutions: int,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    server_app: Any = None,
    client_app: Any = None,
    ray_address: str = "",
) -> dict[str, Any]:
    """Simulate ``institutions`` institutions; return the run's ``report.json`` content.

    ``settings.out_dir`` must be set: the run directory is written there. With
    ``ray_address``, Flower's Ray backend joins that existing cluster
    (``ray.init(address=...)`` through the backend config's ``init_args``) instead of
    starting one here, so the simulated institutions (one CPU each) run on all its
    nodes. They write their ledgers under the run directory: on a cluster of several
    machines it must be on a filesystem every node shares.
    """
    settings = simulated(settings, institutions)
    with contained_flower():
        from flwr.app import Context, RecordDict
        from flwr.common import EventType

        from fedsilo.client.client_app import app as default_client_app
        from fedsilo.runtime.flower.internals import run_simulation_in_process
        from fedsilo.server.server_app import build_server_app

        logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
        context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=settings.to_config())
        run_simulation_in_process(
            num_supernodes=institutions,
            client_app=client_app or default_client_app,
            server_app=server_app or build_server_app(on_round=on_round),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": ray_init_args(institutions, ray_address=ray_address, verbose=verbose),
            },
            server_app_context=context,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            verbose_logging=verbose,
        )
    report_path = Path(settings.out_dir) / "report.json"
    if not report_path.exists():
        raise RuntimeError(f"the simulation ended without writing {report_path}; rerun with --verbose")
    return dict(json.loads(report_path.read_text(encoding="utf-8")))


def ray_init_args(institutions: int, *, ray_address: str = "", verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend's ``ray.init`` arguments: a local Ray of up to one CPU per institution, or a cluster's.

    Joining a cluster, Ray takes its resources from the cluster (``num_cpus`` may not be given).
    """
    common = {"logging_level": "ERROR", "log_to_driver": verbose}
    if ray_address:
        return {"address": ray_address, **common}
    return {"num_cpus": max(1, min(os.cpu_count() or 1, institutions)), "include_dashboard": False, **common}
