"""The coordinator books every reply, aggregates those that trained, and carries each round's counts to its row."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedsilo.common.aggregation import aggregation_for
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.settings import RunSettings
from fedsilo.server.coordinator import Coordinator, EvaluateReply, FitReply
from fedsilo.server.run_directory import RunDirectory

TRAINED = {"noise-multiplier": 1.1, "sample-rate": 0.1, "steps": 10, "epsilon": 0.5, "delta": 1e-5}


def coordinator(path: Path, rows: list[dict[str, Any]]) -> Coordinator:
    settings = RunSettings().with_overrides({"num-server-rounds": 2, "out-dir": str(path)})
    directory = RunDirectory(path, settings, {"keys": ["w"]}, builtin_schema_path("breast-cancer"))
    query = aggregation_for(settings.secagg)
    return Coordinator(directory, query, [np.zeros(2, dtype=np.float32)], on_round=rows.append)


def reply(query_owner: Coordinator, name: str, value: float, records: int) -> FitReply:
    contribution = query_owner.query.prepare([np.full(2, value, dtype=np.float32)], records=records)
    metrics: dict[str, Any] = {"institution": name, **TRAINED}
    if records == 0:
        metrics = {"institution": name, "epsilon": 0.5, "delta": 1e-5, "refused": f"{name} refused"}
    return FitReply(name, contribution, metrics)


def evaluation(name: str) -> EvaluateReply:
    return EvaluateReply(name, 0.5, 10, {"institution": name, "accuracy": 0.75})


def test_a_round_is_booked_aggregated_checkpointed_and_counted(tmp_path: Path) -> None:
    # Prepare
    rows: list[dict[str, Any]] = []
    coord = coordinator(tmp_path, rows)
    replies = [reply(coord, "b", 3.0, 30), reply(coord, "a", 1.0, 10), reply(coord, "c", 9.0, 0)]
    # Execute
    model = coord.aggregate_fit(1, replies, ["lost"])
    loss, metrics = coord.aggregate_evaluate(1, [evaluation("a"), evaluation("b")])
    report = coord.finish(1.0)
    # Assert: the refusal does not move the mean; one refused and one failed are counted in the row
    assert model is not None and np.allclose(model[0], 2.5)
    assert coord.current is model
    assert (tmp_path / "checkpoints" / "round-0001.pt").exists()
    assert loss == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(0.75)
    assert (rows[0]["institutions_trained"], rows[0]["institutions_refused"]) == (2, 2)
    assert report == json.loads((tmp_path / "report.json").read_text())  # returned as written
    assert report["rounds_completed"] == 1
    assert [i["name"] for i in report["institutions"]] == ["a", "b", "c"]
    assert report["institutions"][2]["refusals"] == [{"round": 1, "reason": "c refused"}]


def test_a_halted_round_is_booked_and_counted_but_changes_nothing(tmp_path: Path) -> None:
    # Prepare
    rows: list[dict[str, Any]] = []
    coord = coordinator(tmp_path, rows)
    before = coord.current
    # Execute
    coord.book_fit(1, [reply(coord, "a", 1.0, 10), reply(coord, "b", 3.0, 0)], [])
    coord.aggregate_evaluate(1, [evaluation("a")])
    # Assert
    assert coord.current is before
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert coord.run_dir.last_round == 1 and coord.run_dir.rounds_completed == 0
    with (tmp_path / "metrics.csv").open() as fh:
        row = next(csv.DictReader(fh))
    assert (row["institutions_trained"], row["institutions_refused"]) == ("1", "1")


def test_a_secure_sum_is_finished_by_the_query(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, [])
    replies = [reply(coord, "a", 1.0, 10), reply(coord, "b", 3.0, 30)]
    model = coord.aggregate_fit(1, replies, [], secure_sum=[np.full(2, 7.0, dtype=np.float32)])
    assert model is not None and np.allclose(model[0], 7.0)


def test_a_round_where_everyone_refused_keeps_the_model(tmp_path: Path) -> None:
    coord = coordinator(tmp_path, [])
    assert coord.aggregate_fit(1, [reply(coord, "a", 1.0, 0)], []) is None
    assert np.array_equal(coord.current[0], np.zeros(2))
