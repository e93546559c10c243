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
    query = aggregation_for(settings)
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


def test_a_malformed_fit_reply_is_dropped_with_its_reason_and_the_others_are_aggregated(tmp_path: Path) -> None:
    # Prepare: b's reply lacks its noise multiplier, c reports a delta of 1, d's update is not finite
    rows: list[dict[str, Any]] = []
    coord = coordinator(tmp_path, rows)
    a = reply(coord, "a", 1.0, 10)
    b = reply(coord, "b", 3.0, 30)
    b = FitReply("b", b.contribution, {k: v for k, v in b.metrics.items() if k != "noise-multiplier"})
    c = reply(coord, "c", 5.0, 0)
    c = FitReply("c", c.contribution, {**c.metrics, "delta": 1.0})
    d = reply(coord, "d", np.nan, 10)
    # Execute
    model = coord.aggregate_fit(1, [a, b, c, d], [])
    coord.aggregate_evaluate(1, [evaluation("a")])
    report = coord.finish(1.0)
    # Assert: only a is aggregated and booked; b, c and d are listed as rejected with the key at fault
    assert model is not None and np.allclose(model[0], 1.0)
    assert (rows[0]["institutions_trained"], rows[0]["institutions_refused"]) == (1, 3)
    by_name = {i["name"]: i for i in report["institutions"]}
    assert [e["round"] for e in by_name["a"]["ledger"]] == [1] and by_name["a"]["rejected"] == []
    assert by_name["b"]["ledger"] == [] and "'noise-multiplier' is missing" in by_name["b"]["rejected"][0]["reason"]
    assert by_name["c"]["delta"] == 0.0 and "'delta' must be" in by_name["c"]["rejected"][0]["reason"]
    assert by_name["d"]["ledger"] == [] and "non-finite" in by_name["d"]["rejected"][0]["reason"]
    assert {i["rejected"][0]["stage"] for i in report["institutions"] if i["rejected"]} == {"fit"}


def test_a_malformed_reply_under_secure_aggregation_voids_the_round(tmp_path: Path) -> None:
    # Prepare: b's masked update is inside the secure sum, but its reply is malformed
    coord = coordinator(tmp_path, [])
    before = coord.current
    b = reply(coord, "b", 3.0, 30)
    b = FitReply("b", b.contribution, {**b.metrics, "sample-rate": 2.0})
    # Execute
    model = coord.aggregate_fit(1, [reply(coord, "a", 1.0, 10), b], [], secure_sum=[np.full(2, 7.0, dtype=np.float32)])
    # Assert: the aggregate is not used; a is still booked, b is rejected
    assert model is None and coord.current is before
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert [e["round"] for e in coord.run_dir.institutions["a"].ledger] == [1]
    assert "'sample-rate' must be" in coord.run_dir.institutions["b"].rejected[0]["reason"]


def test_a_malformed_evaluate_reply_is_dropped_from_the_scores(tmp_path: Path) -> None:
    # Prepare
    coord = coordinator(tmp_path, [])
    bad = EvaluateReply("b", 0.1, 10, {"institution": "b", "accuracy": 7.0})
    # Execute
    loss, metrics = coord.aggregate_evaluate(1, [evaluation("a"), bad])
    report = coord.finish(1.0)
    # Assert
    assert loss == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(0.75)
    rejected = {i["name"]: i["rejected"] for i in report["institutions"]}["b"]
    assert rejected[0]["stage"] == "evaluate" and "'accuracy' must be" in rejected[0]["reason"]


def test_the_secure_evaluations_sum_becomes_a_noisy_estimate_and_a_crafted_one_is_dropped(tmp_path: Path) -> None:
    from fedsilo.common import secure_evaluation as seval
    from fedsilo.simulations.inprocess import secure_sum

    # Prepare: round 2 of a secure-evaluation run carries each institution's counts after its model.
    settings = RunSettings().with_overrides(
        {"num-server-rounds": 2, "out-dir": str(tmp_path), "secure-evaluation": True}
    )
    directory = RunDirectory(tmp_path, settings, {"keys": ["w"]}, builtin_schema_path("breast-cancer"))
    coord = Coordinator(directory, aggregation_for(settings), [np.zeros(2, dtype=np.float32)])
    secagg = settings.secagg
    counts = {"a": np.arange(20, dtype=np.int64), "b": np.full(20, 3, dtype=np.int64)}
    replies = []
    for name, records in (("a", 40), ("b", 25)):
        floats = seval.to_secagg_floats(
            counts[name],
            weight=records,
            clipping_range=secagg.clipping_range,
            quantization_range=secagg.quantization_range,
            max_weight=secagg.max_weight,
        )
        contribution = coord.query.prepare([np.full(2, 1.0, dtype=np.float32)], records=records)
        metrics = {"institution": name, **TRAINED, "secure-evaluation": "booked", "evaluation-variance": 0.0}
        replies.append(FitReply(name, type(contribution)([*contribution.vector, floats], contribution.weight), metrics))
    summed = secure_sum([r.contribution for r in replies], secagg, seeds=[1, 2])
    # Execute
    model = coord.aggregate_fit(2, replies, [], secure_sum=summed)
    row = coord.aggregate_evaluate(2, [])[1]
    estimate = directory.rounds[-1]
    # Assert: the model is the model's part alone; the estimate is that of the exact summed counts.
    assert model is not None and len(model) == 1 and np.allclose(model[0], 1.0, atol=1e-4)
    assert row == {}  # no institution shared a clear score
    expected = seval.estimate(counts["a"] + counts["b"], num_classes=2, variance=0.0)
    assert estimate["dp_model_round"] == 1 and estimate["dp_accuracy"] == pytest.approx(expected["accuracy"])
    assert estimate["dp_auc"] == pytest.approx(expected["auc"])
    # A count sum that is not a sum of integers (a crafted reply) is dropped; the model still aggregates.
    total_ratio = sum(
        seval.weight_ratio(
            r.contribution.weight, max_weight=secagg.max_weight, quantization_range=secagg.quantization_range
        )
        for r in replies
    )
    crafted = [summed[0], summed[1] + 0.5 * 2 * secagg.clipping_range / total_ratio]  # half a count off
    again = Coordinator(directory, aggregation_for(settings), [np.zeros(2, dtype=np.float32)])
    assert again.aggregate_fit(2, replies, [], secure_sum=crafted) is not None
    again.aggregate_evaluate(2, [])
    assert directory.rounds[-1].get("dp_accuracy") is None
