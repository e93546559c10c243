"""A sweep's wall time locally vs on a two-node Ray cluster on this machine, and Ray's start-up cost.

Runs the same ``fedsilo-simulate sweep`` twice, as a user would: locally with one
worker process per cluster CPU (``--jobs``), then with ``--ray-address`` on a
head and ``--workers`` worker nodes started here with ``ray start`` (one CPU each).
On one machine the ratio is Ray's overhead; on real hardware the cluster's side
scales with its nodes. Also timed: starting the cluster, importing Ray and joining
it as a driver. A benchmark: it never fails on a time.

    python -m fedsilo.simulations.benchmarks.ray_sweep --out bench/ray_sweep.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fedsilo.simulations.benchmarks import emit, machine
from fedsilo.simulations.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


def timed_sweep(argv: list[str], out: Path, env: dict[str, str] | None = None) -> float:
    """Wall time of one ``fedsilo-simulate sweep`` (start-up included); fails if the sweep does."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "fedsilo.simulations.cli", *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the sweep failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def join_cost(address: str, env: dict[str, str]) -> dict[str, float]:
    """Seconds to import Ray, and to join the cluster as a driver and leave it."""
    probe = (
        "import time; t = time.monotonic(); import ray; i = time.monotonic() - t; t = time.monotonic(); "
        f"ray.init(address={address!r}, logging_level='ERROR'); ray.shutdown(); print(i, time.monotonic() - t)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    imported, joined = (float(v) for v in done.stdout.split()[-2:])
    return {"import_ray_s": imported, "join_and_leave_s": joined}


def same_numbers(a: Path, b: Path) -> bool:
    """The two sweeps' results.csv hold the same numbers (wall times aside)."""
    tables = [pd.read_csv(p / "results.csv").drop(columns=["wall_s"]) for p in (a, b)]
    return bool(tables[0].equals(tables[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,4,inf")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="worker nodes beside the head (one CPU each)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    argv = ["sweep", "--dataset", "breast-cancer", "--epsilons", args.epsilons, "--seeds", args.seeds]
    argv += ["--institutions", "4", "--rounds", str(args.rounds)]
    cpus = 1 + args.workers
    result: dict[str, Any] = {
        "benchmark": f"Sweep {args.epsilons} x seeds {args.seeds}, breast-cancer, 4 hospitals, {args.rounds} rounds: "
        f"local ({cpus} worker processes) vs a Ray cluster of {cpus} one-CPU nodes on this machine",
    }
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as scratch:
        result["local_wall_s"] = timed_sweep([*argv, "--jobs", str(cpus)], Path(scratch) / "local")
        cluster = LocalCluster(workers=args.workers, cpus=1, code=ROOT)
        try:
            started = time.monotonic()
            cluster.start()
            result["cluster_start_s"] = time.monotonic() - started
            result |= join_cost(cluster.address, cluster.env)
            remote = Path(scratch) / "ray"
            result["ray_wall_s"] = timed_sweep([*argv, "--ray-address", cluster.address], remote, env=cluster.env)
            result["nodes_used"] = int(pd.read_csv(remote / "tasks.csv")["node_id"].nunique())
        finally:
            cluster.stop()
        result["ratio_ray_to_local"] = result["ray_wall_s"] / result["local_wall_s"]
        result["same_results"] = same_numbers(Path(scratch) / "local", remote)
    result["machine"] = machine()
    emit(result, args.out)


if __name__ == "__main__":
    main()
