"""Scale: many simulated institutions, a sample of them per round, with SecAgg+.

1,000 institutions on Fashion-MNIST (70,000 images as a 784-column table, about
56 training and 14 held-out records each), 10% sampled per round, each sample's
updates aggregated with Flower's SecAgg+, and another 10% sampled to evaluate
the global model (``--fraction-evaluate 1``: all of them, about 30 s more a
round here), in Flower's simulation engine. Reports
seconds per round (the first, which also starts Ray's workers and loads the
data, and the steady state) and the peak memory of the whole process tree (the
resident set sizes of this process and every process under it, Ray's included,
summed, and the proportional set sizes summed, which count a shared page once). A
benchmark: it prints figures and writes JSON; it never fails on a time.

    python -m fedsilo.simulations.benchmarks.scale --institutions 1000 --fraction-fit 0.1 --num-shares 21 \
        --out bench/scale.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.settings import RunSettings
from fedsilo.simulations.benchmarks import emit, machine, seconds_per_round
from fedsilo.simulations.runner import run_federation

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_memory(root: int) -> tuple[int, int, dict[str, int]]:
    """Bytes resident in ``root`` and all its descendants, read from /proc: RSS summed, PSS summed, PSS by name.

    RSS counts a page shared by several processes (libraries, Ray's object store)
    once per process; PSS divides it among them, so the PSS sum is what the tree
    really holds.
    """
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    rss = pss = 0
    by_name: dict[str, int] = {}
    for pid in tree:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            name = "driver" if pid == root else Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        own = sum(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
        pss += own
        by_name[name] = by_name.get(name, 0) + own
    return rss, pss, by_name


class PeakMemory:
    """Samples ``tree_memory`` of this process in a thread; ``rss`` and ``pss`` are the peaks, in bytes."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.rss = self.pss = 0
        self.at_peak: dict[str, int] = {}  # PSS by process name when the PSS sum peaked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss, by_name = tree_memory(os.getpid())
            self.rss = max(self.rss, rss)
            if pss > self.pss:
                self.pss, self.at_peak = pss, by_name
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run the federation once; return its per-round seconds and peak memory."""
    run_dir = scratch / "run"
    overrides: dict[str, Any] = {
        "dataset": args.dataset,
        "num-server-rounds": args.rounds,
        "fraction-fit": args.fraction_fit,
        "fraction-evaluate": args.fraction_evaluate,
        "secure-aggregation": True,
        "secagg-num-shares": args.num_shares,
        "out-dir": str(run_dir),
        "seed": 0,
    }
    settings = RunSettings().with_overrides(overrides)
    started = time.monotonic()
    with PeakMemory() as memory:
        report = run_federation(settings, institutions=args.institutions, verbose=args.verbose)
    wall = time.monotonic() - started
    per_round = seconds_per_round(run_dir)
    spent = [i["name"] for i in report["institutions"] if i["ledger"]]
    return {
        "institutions": args.institutions,
        "fraction_fit": args.fraction_fit,
        "sampled_per_round": max(int(args.institutions * args.fraction_fit), 2),
        "fraction_evaluate": args.fraction_evaluate,
        "dataset": args.dataset,
        "rounds": args.rounds,
        "secagg": report["secure_aggregation_settings"],
        "seconds_per_round": per_round,
        "first_round_s": per_round[0],
        "steady_s": float(np.median(per_round[1:] if len(per_round) > 1 else per_round)),
        "wall_s": wall,
        "peak_rss_gb": memory.rss / 1e9,
        "peak_pss_gb": memory.pss / 1e9,
        "peak_pss_gb_by_process": {name: round(b / 1e9, 3) for name, b in sorted(memory.at_peak.items())},
        "institutions_trained_per_round": [int(r["institutions_trained"]) for r in report["rounds"]],
        "institutions_that_spent_privacy": len(spent),
        "final_accuracy": report["final_metrics"].get("accuracy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=1000)
    parser.add_argument("--fraction-fit", type=float, default=0.1)
    parser.add_argument("--fraction-evaluate", type=float, default=0.1, help="Institutions evaluating each round.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="fashion-mnist")
    default_shares = RunSettings().secagg.num_shares
    parser.add_argument("--num-shares", type=float, default=default_shares, help="secagg-num-shares: count or fraction")
    parser.add_argument("--verbose", action="store_true", help="Flower's log, with each SecAgg+ stage timed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as scratch:
        figures = measure(args, Path(scratch))
    result = {
        "benchmark": "Scale: simulated institutions, a sample per round, SecAgg+ (Flower simulation engine)",
        "machine": machine(),
        **figures,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
