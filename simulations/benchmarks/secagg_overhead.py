"""The cost of SecAgg+: seconds per round with Flower's SecAgg+ against plain FedAvg.

Same model, data, institutions and seed, in Flower's simulation engine, side by
side for each federation size. Seconds per round come from the run's
``metrics.csv`` (the engine's start-up is left out). A benchmark: it prints
figures and writes JSON; it never fails on a time.

    python -m fedsilo.simulations.benchmarks.secagg_overhead --sizes 5,10,50,100 --out bench/secagg.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.settings import RunSettings
from fedsilo.simulations.benchmarks import emit, machine, seconds_per_round
from fedsilo.simulations.runner import run_federation


def measure(size: int, rounds: int, dataset: str, num_shares: float, scratch: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"institutions": size, "rounds": rounds, "num_shares": num_shares}
    for secure in (False, True):
        run_dir = scratch / f"{size}-{'secagg' if secure else 'plain'}"
        settings = RunSettings().with_overrides(
            {
                "dataset": dataset,
                "num-server-rounds": rounds,
                "secure-aggregation": secure,
                "secagg-num-shares": num_shares,
                "out-dir": str(run_dir),
                "seed": 0,
            }
        )
        run_federation(settings, institutions=size)
        per_round = seconds_per_round(run_dir)
        # Round 1 also pays for Ray's actors starting; later rounds are the steady state.
        out["secagg" if secure else "plain"] = {
            "seconds_per_round": per_round,
            "steady_s": float(np.median(per_round[1:] if len(per_round) > 1 else per_round)),
        }
    out["ratio"] = out["secagg"]["steady_s"] / out["plain"]["steady_s"]
    print(
        f"{size} institutions: plain {out['plain']['steady_s']:.2f} s/round, "
        f"SecAgg+ {out['secagg']['steady_s']:.2f} s/round, ratio {out['ratio']:.2f}",
        flush=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5,10,50,100:2", help="Federation sizes, comma-separated (SIZE:ROUNDS).")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of a size given without its own.")
    parser.add_argument("--num-shares", type=float, default=RunSettings().secagg.num_shares)
    parser.add_argument("--dataset", default="german-credit")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    specs = (spec.partition(":") for spec in args.sizes.split(","))
    sizes = [(int(size), int(rounds or args.rounds)) for size, _, rounds in specs]
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as scratch:
        results = [measure(size, rounds, args.dataset, args.num_shares, Path(scratch)) for size, rounds in sizes]
    result = {
        "benchmark": "SecAgg+ overhead per round (Flower simulation engine)",
        "machine": machine(),
        "dataset": args.dataset,
        "num_shares": args.num_shares,
        "results": results,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
