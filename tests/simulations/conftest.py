"""Flower simulations shared by the tests of this package (each costs about 20 s, so each runs once)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from fedsilo.common.settings import RunSettings
from fedsilo.server.server_app import build_server_app
from fedsilo.server.strategy import FedsiloStrategy
from fedsilo.simulations.runner import run_federation

INSTITUTIONS = 3
ROUNDS = 3
POLICY = (
    "[institutions.hospital-1]\nmax-epsilon = 1.4\n\n"
    "[institutions.hospital-2]\nmax-local-epochs = 1\n\n"
    "[institutions.hospital-4]\nshare-eval-metrics = false\n"
)


# Distributed DP: one aggregated DP-SGD step a round, evaluated every second round (and the last).
DISTRIBUTED = {"dp-mode": "distributed", "num-server-rounds": 5, "eval-every": 2, "sample-rate": 0.3}


class SpyStrategy(FedsiloStrategy):
    """Records every parameter set that reaches ``aggregate_fit``, per round."""

    seen: ClassVar[list[list[list[np.ndarray]]]] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        SpyStrategy.seen.append([parameters_to_ndarrays(res.parameters) for _, res in results])
        return super().aggregate_fit(server_round, results, failures)


def simulate(out: Path, **overrides: Any) -> tuple[dict[str, Any], list[list[list[np.ndarray]]]]:
    settings = RunSettings().with_overrides({"num-server-rounds": ROUNDS, "seed": 7, "out-dir": str(out), **overrides})
    SpyStrategy.seen = []
    report = run_federation(settings, institutions=INSTITUTIONS, server_app=build_server_app(strategy_cls=SpyStrategy))
    return report, SpyStrategy.seen


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any], list[Any]]]:
    out = {}
    for name, overrides in (
        ("secagg", {}),
        ("secagg-again", {}),
        ("plain", {"secure-aggregation": False}),
        ("distributed", DISTRIBUTED),
    ):
        path = tmp_path_factory.mktemp(name)
        report, seen = simulate(path, **overrides)
        out[name] = (path, report, seen)
    # Two hospitals come back with their budget spent; the third is fresh.
    path = tmp_path_factory.mktemp("exhausted")
    for name in ("hospital-1", "hospital-2"):
        shutil.copytree(out["secagg"][0] / "state" / name, path / "state" / name)
    report, seen = simulate(path, **{"state-root": str(path / "state"), "num-server-rounds": 2})
    out["exhausted"] = (path, report, seen)
    # Four hospitals, each with its own policy: one runs out of budget after a round,
    # one refuses the coordinator's epochs, one keeps its evaluation metrics to itself.
    path = tmp_path_factory.mktemp("policies")
    (path / "policy.toml").write_text(POLICY)
    settings = RunSettings().with_overrides(
        {"num-server-rounds": ROUNDS, "seed": 7, "out-dir": str(path), "simulation-policy": str(path / "policy.toml")}
    )
    SpyStrategy.seen = []
    report = run_federation(settings, institutions=4, server_app=build_server_app(strategy_cls=SpyStrategy))
    out["policies"] = (path, report, SpyStrategy.seen)
    return out
