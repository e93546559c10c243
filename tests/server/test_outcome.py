"""A run that aggregated no round is reported as untrained, and `fedsilo-server run` exits 1 on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer

from fedsilo.common.aggregation import aggregation_for
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.settings import RunSettings
from fedsilo.server.cli import conclude
from fedsilo.server.coordinator import Coordinator, EvaluateReply, FitReply
from fedsilo.server.outcome import untrained_reason
from fedsilo.server.run_directory import RunDirectory

TRAINED = {"noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 10, "epsilon": 0.5, "delta": 1e-5}


def finished_run(path: Path, rounds: list[list[tuple[str, int]]]) -> dict[str, Any]:
    """A run directory whose rounds get fit replies (name, records; 0: refused), as the coordinator writes it."""
    settings = RunSettings().with_overrides({"num-server-rounds": len(rounds), "out-dir": str(path)})
    directory = RunDirectory(path, settings, {"keys": ["w"]}, builtin_schema_path("breast-cancer"))
    coord = Coordinator(directory, aggregation_for(settings), [np.zeros(2, dtype=np.float32)])
    for server_round, replies in enumerate(rounds, start=1):
        fits = []
        for name, records in replies:
            contribution = coord.query.prepare([np.ones(2, dtype=np.float32)], records=records)
            extra = TRAINED if records else {"epsilon": 0.5, "delta": 1e-5, "refused": f"{name} refused"}
            fits.append(FitReply(name, contribution, {"institution": name, **extra}))
        coord.aggregate_fit(server_round, fits, [])
        coord.aggregate_evaluate(server_round, [EvaluateReply(n, 0.5, 10, {"accuracy": 0.5}) for n, _ in replies])
    return coord.finish(1.0)


def test_a_run_that_aggregated_a_round_is_trained(tmp_path: Path) -> None:
    report = finished_run(tmp_path, [[("a", 0), ("b", 0)], [("a", 10), ("b", 0)]])
    assert untrained_reason(report, tmp_path) is None
    conclude(tmp_path)  # no exit


def test_a_run_where_everyone_refused_is_untrained_and_the_server_exits_1(tmp_path: Path) -> None:
    # Prepare
    report = finished_run(tmp_path, [[("a", 0), ("b", 0)], [("a", 0)]])
    # Execute
    reason = untrained_reason(report, tmp_path)
    with pytest.raises(typer.Exit) as stopped:
        conclude(tmp_path)
    # Assert
    assert reason is not None and "(3 of 3 institution-rounds refused)" in reason
    assert stopped.value.exit_code == 1


def test_a_run_where_no_institution_ever_replied_says_to_read_their_logs(tmp_path: Path) -> None:
    # Prepare: as when every institution crashed before replying (Flower: "Insufficient available nodes")
    report = finished_run(tmp_path, [[], []])
    # Execute
    reason = untrained_reason(report, tmp_path)
    with pytest.raises(typer.Exit) as stopped:
        conclude(tmp_path)
    # Assert
    assert reason is not None and "no institution replied in any of 2 round(s)" in reason
    assert "each institution's log" in reason
    assert stopped.value.exit_code == 1


def test_a_run_without_a_report_exits_1(tmp_path: Path) -> None:
    with pytest.raises(typer.Exit) as stopped:
        conclude(tmp_path)
    assert stopped.value.exit_code == 1
