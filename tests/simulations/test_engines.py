"""The in-process engine reproduces the Flower engine: same seed, same accuracy, same epsilon, same refusals.

Each Flower run comes from the shared ``runs`` fixture (conftest.py); the
in-process engine reruns its configuration here in a second or two.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsilo.common.settings import RunSettings
from fedsilo.simulations.inprocess import run_inprocess
from tests.simulations.conftest import DISTRIBUTED, INSTITUTIONS, POLICY, ROUNDS

pytestmark = pytest.mark.simulation


def inprocess(out: Path, institutions: int = INSTITUTIONS, **overrides: Any) -> dict[str, Any]:
    settings = RunSettings().with_overrides({"num-server-rounds": ROUNDS, "seed": 7, "out-dir": str(out), **overrides})
    return run_inprocess(settings, institutions=institutions)


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((path / "metrics.csv").open()))


def privacy_view(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """What each institution spent and refused, per round."""
    return [
        (i["name"], i["num_examples"], i["epsilon"], i["ledger"], [(r["round"], r["reason"]) for r in i["refusals"]])
        for i in report["institutions"]
    ]


@pytest.mark.parametrize("name", ["secagg", "plain"])
def test_both_engines_agree_on_accuracy_and_exactly_on_epsilon(runs: dict[str, Any], tmp_path: Path, name: str) -> None:
    flower_dir, flower, _ = runs[name]
    report = inprocess(tmp_path, **{"secure-aggregation": name == "secagg"})
    assert abs(report["final_metrics"]["accuracy"] - flower["final_metrics"]["accuracy"]) <= 0.005
    assert [i["epsilon"] for i in report["institutions"]] == [i["epsilon"] for i in flower["institutions"]]
    assert privacy_view(report) == privacy_view(flower)
    # The same run directory contract, round for round.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in flower_dir.iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(
        p.name for p in (flower_dir / "checkpoints").iterdir()
    )
    ours, theirs = rows(tmp_path), rows(flower_dir)
    assert [(r["round"], r["max_epsilon"], r["institutions_trained"]) for r in ours] == [
        (r["round"], r["max_epsilon"], r["institutions_trained"]) for r in theirs
    ]
    assert set(report) == set(flower)
    # SecAgg+'s clipping and seeded quantization are reproduced: the models agree to float precision.
    ours_model, flower_model = torch.load(tmp_path / "model.pt"), torch.load(flower_dir / "model.pt")
    assert all(torch.allclose(ours_model[k], flower_model[k], atol=1e-5) for k in flower_model)


def test_distributed_dp_gives_bit_identical_models_on_both_engines(runs: dict[str, Any], tmp_path: Path) -> None:
    flower_dir, flower, _ = runs["distributed"]
    report = inprocess(tmp_path, **DISTRIBUTED)
    # Everything is integers through SecAgg+: the same shares, the same sum, the same step.
    ours, theirs = torch.load(tmp_path / "model.pt"), torch.load(flower_dir / "model.pt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for round_ in range(1, 6):
        name = f"round-{round_:04d}.pt"
        if (flower_dir / "checkpoints" / name).exists():
            a, b = torch.load(tmp_path / "checkpoints" / name), torch.load(flower_dir / "checkpoints" / name)
            assert all(torch.equal(a[k], b[k]) for k in b)
    assert privacy_view(report) == privacy_view(flower)
    assert report["rounds_completed"] == flower["rounds_completed"] == 5
    # Each institution's ledger holds one Skellam step a round, with what the round assumed.
    ledger = flower["institutions"][0]["ledger"]
    assert [(e["mechanism"], e["steps"]) for e in ledger] == [("skellam", 1)] * 5
    # eval-every 2: scores after rounds 2, 4 and the last, a row for every round.
    scored = [r["round"] for r in rows(flower_dir) if r["accuracy"]]
    assert scored == [r["round"] for r in rows(tmp_path) if r["accuracy"]] == ["2", "4", "5"]
    assert report["final_metrics"]["accuracy"] == flower["final_metrics"]["accuracy"]


def test_refusals_by_policy_are_the_same_on_both_engines(runs: dict[str, Any], tmp_path: Path) -> None:
    flower_dir, flower, _ = runs["policies"]
    (tmp_path / "policy.toml").write_text(POLICY)
    report = inprocess(tmp_path / "run", institutions=4, **{"simulation-policy": str(tmp_path / "policy.toml")})
    assert privacy_view(report) == privacy_view(flower)
    assert [(r["institutions_trained"], r["institutions_refused"]) for r in rows(tmp_path / "run")] == [
        (r["institutions_trained"], r["institutions_refused"]) for r in rows(flower_dir)
    ]
    assert abs(report["final_metrics"]["accuracy"] - flower["final_metrics"]["accuracy"]) <= 0.005


def test_a_lone_trainer_halts_the_round_on_both_engines(runs: dict[str, Any], tmp_path: Path) -> None:
    flower_dir, flower, _ = runs["exhausted"]
    for name in ("hospital-1", "hospital-2"):  # the same spent budgets the Flower run started from
        shutil.copytree(runs["secagg"][0] / "state" / name, tmp_path / "state" / name)
    report = inprocess(tmp_path, **{"state-root": str(tmp_path / "state"), "num-server-rounds": 2})
    assert privacy_view(report) == privacy_view(flower)
    assert report["rounds_completed"] == flower["rounds_completed"] == 0
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert [(r["institutions_trained"], r["institutions_refused"]) for r in rows(tmp_path)] == [
        (r["institutions_trained"], r["institutions_refused"]) for r in rows(flower_dir)
    ]
