"""In a deployment every reply is booked under the name admitted with its node's key, whatever the reply says."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedsilo.common.aggregation import aggregation_for
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.settings import RunSettings
from fedsilo.server import processes
from fedsilo.server.coordinator import Coordinator
from fedsilo.server.federation import Federation
from fedsilo.server.run_directory import RunDirectory
from fedsilo.server.strategy import FedsiloStrategy, FitResults

TRAINED = {"noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 10, "epsilon": 0.5, "delta": 1e-5}


def admit(tmp_path: Path, run_dir: Path, names: dict[str, str]) -> None:
    """As `fedsilo-server run` does: registered.json (name -> node id) copied into the run directory."""
    superlink = tmp_path / "superlink"
    superlink.mkdir()
    registered = {name: {"fingerprint": "f", "node-id": node} for node, name in names.items()}
    (superlink / "registered.json").write_text(json.dumps(registered), encoding="utf-8")
    processes.record_admitted(cast(Federation, SimpleNamespace(superlink_dir=superlink)), run_dir)


def strategy(run_dir: Path) -> FedsiloStrategy:
    settings = RunSettings().with_overrides({"secure-aggregation": False, "out-dir": str(run_dir)})
    directory = RunDirectory(run_dir, settings, {"keys": ["w"]}, builtin_schema_path("breast-cancer"))
    coordinator = Coordinator(directory, aggregation_for(settings), [np.zeros(2, dtype=np.float32)])
    return FedsiloStrategy(settings, coordinator, {})


def result(node: str, asserted: str, value: float) -> tuple[Any, FitRes]:
    parameters = ndarrays_to_parameters([np.full(2, value, dtype=np.float32)])
    metrics = {"institution": asserted, **TRAINED}
    return SimpleNamespace(cid=node), FitRes(Status(Code.OK, ""), parameters, 10, metrics)


def test_an_institution_cannot_book_under_another_admitted_name(tmp_path: Path) -> None:
    # Prepare: node 22 (admitted as beta) claims to be alpha
    run_dir = tmp_path / "run"
    admit(tmp_path, run_dir, {"11": "alpha", "22": "beta"})
    fedsilo = strategy(run_dir)
    results = cast(FitResults, [result("11", "alpha", 1.0), result("22", "alpha", 3.0)])
    # Execute
    fedsilo.aggregate_fit(1, results, [])
    # Assert: two rows, each under its admitted name, each with its own round
    booked = fedsilo.coordinator.run_dir.institutions
    assert sorted(booked) == ["alpha", "beta"]
    assert [len(booked[n].ledger) for n in ("alpha", "beta")] == [1, 1]


def test_without_admitted_names_replies_are_named_as_they_say(tmp_path: Path) -> None:
    # Prepare: a simulation has no admitted.json
    fedsilo = strategy(tmp_path / "run")
    # Execute
    fedsilo.aggregate_fit(1, cast(FitResults, [result("11", "alpha", 1.0), result("22", "beta", 3.0)]), [])
    # Assert
    assert sorted(fedsilo.coordinator.run_dir.institutions) == ["alpha", "beta"]
