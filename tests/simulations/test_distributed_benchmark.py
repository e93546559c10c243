"""The distributed-DP benchmark's plumbing on a tiny run (3 distributed rounds, a few seconds): no figure is checked."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedsilo.simulations.baselines import federation_members
from fedsilo.simulations.benchmarks import distributed_dp as bench
from fedsilo.simulations.runner import simulated

INSTITUTIONS = 4


def test_defaults_and_honest_counts() -> None:
    args = bench.parse_args([])
    assert (args.datasets, args.institutions, args.epsilon, args.delta) == ("german-credit,breast-cancer", 4, 2.0, 1e-5)
    assert (args.seeds, args.sample_rates, args.min_honest, args.reconstruction_threshold) == ("42", "default", "", 1.0)
    assert (args.train_max_rounds, args.rounds, args.schema_path, args.out) == (1000, 0, "", None)
    assert bench.honest_counts(4) == [4, 2, 1]
    assert bench.honest_counts(5) == [5, 2, 1]
    assert bench.honest_counts(2) == [2, 1]
    assert bench.honest_counts(1) == [1]


def test_a_tiny_distributed_run_makes_a_row(tmp_path: Path) -> None:
    args = argparse.Namespace(epsilon=2.0, delta=1e-5)
    settings = simulated(bench.base_settings(args, "breast-cancer", 3, str(tmp_path / "members")), INSTITUTIONS)
    members = federation_members(settings, INSTITUTIONS)
    recipe = bench.pooled_recipe(settings, members)
    assert recipe.planned_steps == recipe.steps * settings.rounds and 0 < recipe.sample_rate <= 1
    distributed = settings.with_overrides(
        {
            "dp-mode": "distributed",
            "num-server-rounds": 3,
            "sample-rate": 0.1,
            "eval-every": 3,
            "secagg-reconstruction-threshold": 1.0,
        }
    )
    noise = bench.noise_comparison(distributed, members)
    assert noise["rounds"] == 3 and noise["sample_rate"] == 0.1
    assert noise["ratio"] == noise["skellam_noise_multiplier"] / noise["gaussian_pld_noise_multiplier"] > 1
    row = bench.run_federated("distributed", distributed, members, min_honest=2)
    assert (row["method"], row["min_honest"], row["rounds"], row["steps"], row["refusals"]) == (
        "distributed",
        2,
        3,
        3,
        0,
    )
    assert row["noise_multiplier"] == noise["skellam_noise_multiplier"]
    assert 0 < row["epsilon_spent"] <= 2.0
    assert {"accuracy", "auc"} <= set(row) and {"accuracy", "auc"} <= set(row["union"])
    again = bench.run_federated("distributed", distributed, members, min_honest=2)  # its own fresh ledgers
    assert (again["refusals"], again["epsilon_spent"], again["auc"]) == (0, row["epsilon_spent"], row["auc"])
    fixed = distributed.with_overrides({"noise-multiplier": 1.0})
    diagnostic = bench.run_federated(bench.GAUSSIAN_EQUIVALENT, fixed, members, min_honest=INSTITUTIONS)
    assert diagnostic["noise_multiplier"] == 1.0 and diagnostic["refusals"] == 0
    assert len(bench._line(row)) == len(bench.HEADER)


def test_the_summary_pairs_each_seed_with_its_pooled_run() -> None:
    def row(method: str, seed: int, auc: float) -> dict[str, object]:
        common = {"min_honest": None, "sample_rate": 1.0, "rounds": 8, "accuracy": auc, "seconds": 1.0}
        return {"method": method, "dataset": "d", "seed": seed, "auc": auc, **common}

    results = [
        {"rows": [row("pooled", 1, 0.70), row("distributed", 1, 0.72)]},
        {"rows": [row("pooled", 2, 0.60), row("distributed", 2, 0.59)]},
    ]
    summary = {e["method"]: e for e in bench.summarize(results)}
    assert summary["distributed"]["auc"]["mean"] == pytest.approx(0.655)
    assert summary["distributed"]["auc"]["per_seed"] == [0.72, 0.59]
    assert summary["distributed"]["auc_gap_to_pooled"]["mean"] == pytest.approx(0.005)
    assert summary["pooled"]["auc_gap_to_pooled"]["mean"] == 0.0
    assert len(bench._summary_line(summary["distributed"])) > 0
