"""Private federation-wide evaluation in both engines: the coordinator learns noisy pooled figures and nothing else.

Institutions whose policy shares no evaluation metrics (``share-eval-metrics = false``, the
deployed default) still give the coordinator federation-wide accuracy and AUC, summed under
SecAgg+ with Skellam noise. Each federation runs once in Flower's simulation engine (real
SecAgg+, masks and all) and once in the in-process engine; what reaches Flower's strategy is
recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays

from fedsilo.common import secure_evaluation as seval
from fedsilo.common.models import build_model
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import predict_proba
from fedsilo.server.server_app import build_server_app
from fedsilo.server.strategy import FedsiloStrategy
from fedsilo.simulations.baselines import federation_members
from fedsilo.simulations.inprocess import run_inprocess
from fedsilo.simulations.runner import run_federation

pytestmark = pytest.mark.simulation

INSTITUTIONS = 3
MODES = {
    "local": {},
    "distributed": {"dp-mode": "distributed", "sample-rate": 0.5},
}
# Count noise about 1.7 per cell over three institutions: a test-sized federation (114 held-out records).
COMMON = {"num-server-rounds": 3, "seed": 7, "secure-evaluation": True, "target-epsilon": 100.0}
# Only what Flower delivers to the strategy is allowed in a fit reply's clear metrics.
CLEAR_KEYS = {
    "institution",
    "delta",
    "neighbouring",  # the relation its epsilon is accounted for: its policy's, not its records'
    "epsilon",
    "epsilon-worst-case",
    "steps",
    "noise-multiplier",
    "sample-rate",
    "records",
    "counted-honest",
    "secure-evaluation",
    "evaluation-variance",
    "refused",
}


class FitSpy(FedsiloStrategy):
    """Records what reaches ``aggregate_fit``: each reply's parameters and clear metrics, per round."""

    seen: ClassVar[dict[int, list[tuple[list[np.ndarray], dict[str, Any]]]]] = {}

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        FitSpy.seen[server_round] = [(parameters_to_ndarrays(res.parameters), dict(res.metrics)) for _, res in results]
        return super().aggregate_fit(server_round, results, failures)


def settings_for(out: Path, mode: str) -> RunSettings:
    (out.parent / "policy.toml").write_text("share-eval-metrics = false\n")
    overrides = {**COMMON, **MODES[mode], "out-dir": str(out), "simulation-policy": str(out.parent / "policy.toml")}
    return RunSettings().with_overrides(overrides)


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        flower_dir = tmp_path_factory.mktemp(f"flower-{mode}") / "run"
        FitSpy.seen = {}
        flower = run_federation(
            settings_for(flower_dir, mode),
            institutions=INSTITUTIONS,
            server_app=build_server_app(strategy_cls=FitSpy),
        )
        seen = dict(FitSpy.seen)
        ours_dir = tmp_path_factory.mktemp(f"inprocess-{mode}") / "run"
        ours = run_inprocess(settings_for(ours_dir, mode), institutions=INSTITUTIONS)
        out[mode] = (flower_dir, flower, seen, ours_dir, ours)
    return out


def pooled_accuracy(run_dir: Path, settings: RunSettings, model_round: int) -> tuple[float, np.ndarray]:
    """The model of ``model_round``'s accuracy on every institution's held-out records pooled, and its exact counts."""
    members = federation_members(settings, INSTITUTIONS)
    model = build_model(settings.train, members[0].schema, seed=settings.seed)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / f"round-{model_round:04d}.pt"))
    x = np.concatenate([m.test_x for m in members])
    y = np.concatenate([m.test_y for m in members])
    probabilities = predict_proba(model, x)
    return float(np.mean(probabilities.argmax(axis=1) == y)), seval.counts(probabilities, y, 2)


@pytest.mark.parametrize("mode", MODES)
def test_the_coordinator_learns_the_pooled_accuracy_within_the_noise(federations: dict[str, Any], mode: str) -> None:
    flower_dir, flower, _, ours_dir, ours = federations[mode]
    for run_dir, report in ((flower_dir, flower), (ours_dir, ours)):
        # No institution shared a clear score: without the secure evaluation the coordinator would see n/a.
        assert report["final_metrics"].get("accuracy") is None
        estimates = [r for r in report["rounds"] if r.get("dp_model_round") is not None]
        assert [r["dp_model_round"] for r in estimates] == [1, 2]  # fit rounds 2 and 3 score models 1 and 2
        settings = settings_for(run_dir, mode)
        for row in estimates:
            truth, counts = pooled_accuracy(run_dir, settings, row["dp_model_round"])
            # Within four standard deviations of the noise (binning cannot move accuracy at 0.5).
            assert abs(row["dp_accuracy"] - truth) <= 4 * row["dp_accuracy_sd"] + 1e-9
            assert 0 < row["dp_accuracy_sd"] < 0.1
            assert row["dp_noise_sd"] == pytest.approx(np.sqrt(sum_of_variances(settings)))
            assert row["dp_auc"] is not None and 0 <= row["dp_auc"] <= 1
            assert counts.sum() == len(np.concatenate([m.test_y for m in federation_members(settings, 3)]))
        latest = report["secure_evaluation"]["latest"]
        assert latest["accuracy"] == estimates[-1]["dp_accuracy"]
        assert report["secure_evaluation"]["evaluations_planned"] == 2
        # Each institution's run ends within the target, evaluations included.
        for institution in report["institutions"]:
            assert institution["epsilon"] <= COMMON["target-epsilon"]
            assert institution["epsilon_this_run"] == pytest.approx(institution["epsilon"], rel=1e-9)
            assert [e["round"] for e in institution["ledger"] if e.get("mechanism") == "secure-evaluation"] == [2, 3]
    # Integers through SecAgg+ are exact and the noise is seeded the same: both engines find the same figures.
    assert flower["secure_evaluation"]["latest"] == ours["secure_evaluation"]["latest"]


def sum_of_variances(settings: RunSettings) -> float:
    """The noise variance the sum carries: three institutions, each its own (local) or its share (distributed)."""
    plan = seval.evaluation_plan(settings.proposal)
    assert plan is not None
    return INSTITUTIONS * plan.variance  # min-honest 1: each adds the whole variance in both modes


@pytest.mark.parametrize("mode", MODES)
def test_no_reply_carries_an_institutions_counts_in_the_clear(federations: dict[str, Any], mode: str) -> None:
    _, _, seen, ours_dir, _ = federations[mode]
    assert sorted(seen) == [1, 2, 3]
    for server_round, replies in seen.items():
        assert len(replies) == INSTITUTIONS
        first = replies[0][0]
        # Under SecAgg+ every reply carries the same recovered sum, never its own vector.
        for parameters, metrics in replies:
            assert len(parameters) == len(first)
            assert all(np.array_equal(a, b) for a, b in zip(parameters, first, strict=True))
            assert set(metrics) <= CLEAR_KEYS
            assert all(isinstance(v, bool | int | float | str) for v in metrics.values())
        if server_round > 1:
            assert all(m["secure-evaluation"] == "booked" for _, m in replies)
    # What the coordinator keeps holds no institution's counts either: only the pooled estimate.
    progress = json.loads((ours_dir / "progress.json").read_text())
    for record in progress["institutions"].values():
        assert not any("count" in key or "accuracy" in key for key in record)
        assert not any("accuracy" in key or "auc" in key for row in record["ledger"] for key in row)


def test_distributed_models_stay_bit_identical_on_both_engines_with_secure_evaluation(
    federations: dict[str, Any],
) -> None:
    flower_dir, _, _, ours_dir, _ = federations["distributed"]
    for name in ("model.pt", "checkpoints/round-0001.pt", "checkpoints/round-0003.pt"):
        ours, theirs = torch.load(ours_dir / name), torch.load(flower_dir / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
