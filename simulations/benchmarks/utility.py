"""Utility of the default recipe on the built-in tabular datasets: federated against pooled, alone and reference.

For each dataset (breast cancer, 4 hospitals; German credit, 3 banks; digits, 4
clinics), a sweep over epsilon 1, 2, 4, 8 and no DP with 3 seeds, every other
setting at its default (the recipe, the linear model, the PLD accountant,
SecAgg+), on the in-process engine. The lead metric is ROC AUC for binary tasks
and accuracy for multi-class ones; the majority-class rate is printed beside it.
With ``--ablation``, German credit and breast cancer are also run federated at
epsilon 1 and without DP under the settings before the recipe (MLP, batch 32,
learning rate 0.2, RDP accountant), then with each change added in turn, so
what each change contributed can be read off. A benchmark: it prints figures
and checks targets, but never fails on them.

    python -m fedsilo.simulations.benchmarks.utility --out bench/utility.json
    python -m fedsilo.simulations.benchmarks.utility --datasets german-credit --seeds 0 --epsilons 1 \
        --out bench/utility.json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fedsilo.simulations.benchmarks import emit, machine
from fedsilo.simulations.sweep import run_sweep
from fedsilo.simulations.sweep_spec import SweepSpec

DATASETS = {"breast-cancer": 4, "german-credit": 3, "digits": 4}
BINARY = {"breast-cancer": True, "german-credit": True, "digits": False}
METHODS = ("federated", "pooled", "alone", "reference")
# The settings before the recipe (stop 9), then each change added in turn.
ABLATION: dict[str, dict[str, Any]] = {
    "before (mlp, batch 32, lr 0.2, rdp)": {
        "model": "mlp",
        "batch-size": 32,
        "learning-rate": 0.2,
        "accountant": "rdp",
    },
    "+ recipe (auto batch and lr)": {"model": "mlp", "accountant": "rdp"},
    "+ linear model": {"accountant": "rdp"},
    "+ PLD accountant (today's defaults)": {},
}


def sweep(
    dataset: str,
    *,
    epsilons: tuple[float, ...],
    seeds: tuple[int, ...],
    rounds: int,
    jobs: int,
    settings: dict[str, Any],
    scratch: Path,
) -> pd.DataFrame:
    """One sweep's results table (every method, level and seed)."""
    spec = SweepSpec(
        dataset=dataset,
        rounds=rounds,
        epsilons=epsilons,
        institutions=(DATASETS[dataset],),
        seeds=seeds,
        settings=settings,
    )
    out = Path(tempfile.mkdtemp(dir=scratch))
    tables = run_sweep(spec, out, jobs=jobs)
    if len(tables["failures"]):  # a benchmark with a federation missing would mislead: stop
        raise RuntimeError(f"a federation of the sweep failed:\n{tables['failures']['details'].iloc[0]}")
    return tables["results"]


def metric_of(dataset: str) -> str:
    return "auc" if BINARY[dataset] else "accuracy"


def summarise(dataset: str, results: pd.DataFrame) -> list[dict[str, Any]]:
    """Mean and spread of the lead metric per level and method, with the majority rate and accuracy."""
    metric = metric_of(dataset)
    rows = []
    for (target, method), part in results.groupby(["target_epsilon", "method"], sort=False):
        rows.append(
            {
                "dataset": dataset,
                "institutions": DATASETS[dataset],
                "epsilon": "inf" if math.isinf(target) else float(target),
                "method": method,
                "metric": metric,
                "mean": float(part[metric].mean()),
                "std": float(part[metric].std(ddof=0)),
                "accuracy": float(part["accuracy"].mean()),
                "majority_rate": float(part["majority_rate"].mean()),
                "epsilon_spent": float(part["epsilon"].max()),
                "seeds": int(part["seed"].nunique()),
            }
        )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure measured and whether it is met."""

    def cell(dataset: str, epsilon: Any, method: str) -> dict[str, Any] | None:
        return next(
            (r for r in rows if r["dataset"] == dataset and r["epsilon"] == epsilon and r["method"] == method), None
        )

    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        reference = cell(dataset, "inf", "reference")
        federated = cell(dataset, "inf", "federated")
        if reference and federated:
            gap = reference["mean"] - federated["mean"]
            out.append(
                {
                    "target": f"{dataset}: no DP, federated within 0.01 {reference['metric']} of reference",
                    "figure": f"{federated['mean']:.3f} vs {reference['mean']:.3f} (gap {gap:+.3f})",
                    "met": gap <= 0.01,
                }
            )
        private = cell(dataset, 1.0, "federated")
        if private:
            out.append(
                {
                    "target": f"{dataset}: epsilon 1, federated accuracy above the majority rate",
                    "figure": f"{private['accuracy']:.3f} vs {private['majority_rate']:.3f}",
                    "met": private["accuracy"] > private["majority_rate"],
                }
            )
            if dataset == "german-credit" and reference:
                halfway = 0.5 + (reference["mean"] - 0.5) / 2
                out.append(
                    {
                        "target": "german-credit: epsilon 1, federated AUC at least halfway from 0.5 to reference",
                        "figure": f"{private['mean']:.3f} vs {halfway:.3f}",
                        "met": private["mean"] >= halfway,
                    }
                )
    return out


def ablation(dataset: str, *, seeds: tuple[int, ...], rounds: int, jobs: int, scratch: Path) -> list[dict[str, Any]]:
    """Federated AUC at epsilon 1 and without DP under the old settings, then each change added."""
    rows = []
    for label, settings in ABLATION.items():
        results = sweep(
            dataset, epsilons=(1.0,), seeds=seeds, rounds=rounds, jobs=jobs, settings=settings, scratch=scratch
        )
        federated = results[results["method"] == "federated"]
        for target, part in federated.groupby("target_epsilon"):
            rows.append(
                {
                    "dataset": dataset,
                    "variant": label,
                    "epsilon": "inf" if math.isinf(target) else target,
                    "metric": metric_of(dataset),
                    "mean": float(part[metric_of(dataset)].mean()),
                    "std": float(part[metric_of(dataset)].std(ddof=0)),
                    "accuracy": float(part["accuracy"].mean()),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epsilons", default="1,2,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--ablation", action="store_true", help="also the before/after rows (German credit, breast cancer)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    epsilons = tuple(float(e) for e in args.epsilons.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    ablations: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-utility-") as scratch:
        for dataset in args.datasets.split(","):
            results = sweep(
                dataset,
                epsilons=epsilons,
                seeds=seeds,
                rounds=args.rounds,
                jobs=args.jobs,
                settings={},
                scratch=Path(scratch),
            )
            rows += summarise(dataset, results)
        if args.ablation:
            for dataset in ("german-credit", "breast-cancer"):
                ablations += ablation(dataset, seeds=seeds, rounds=args.rounds, jobs=args.jobs, scratch=Path(scratch))
    result = {
        "benchmark": "Utility of the default recipe: federated vs pooled, alone, reference",
        "rounds": args.rounds,
        "seeds": list(seeds),
        "rows": rows,
        "targets": targets(rows),
        "ablation": ablations,
        "wall_s": time.monotonic() - started,
        "machine": machine(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
