"""Round latency of a real deployment: a SuperLink and 3 SuperNodes over TLS with SecAgg+, on 127.0.0.1.

Runs the same commands a coordinator and institutions run (``fedsilo-server
init/admit/start/run``, ``fedsilo-client keys/start``) in a temporary directory
on free ports, and reports seconds per round from the run's ``metrics.csv``.
A benchmark, not a test: it prints figures and writes JSON; it never fails on
a time.

    python -m simulations.benchmarks.deployment_latency --rounds 3 --out bench/deployment.json
"""

from __future__ import annotations

import argparse
import csv
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.datasets import load_builtin
from common.flower_env import executable, free_port
from server.deployment import healthy
from simulations.benchmarks import emit, machine


def measure(rounds: int, institutions: int, dataset: str, work: Path, *, warm: bool = True) -> dict[str, Any]:
    """Set up a federation, run ``rounds`` rounds, return per-round seconds.

    ``warm``: each institution runs its warm trainer (the default); otherwise
    every fit and evaluate starts from a cold ClientApp process.
    """
    work.mkdir(parents=True)
    port, fed = free_port(), work / "fed"
    server, client = executable("fedsilo-server"), executable("fedsilo-client")
    init = [server, "init", str(fed), "--dataset", dataset, "--port", str(port)]
    subprocess.run(init, check=True, capture_output=True)
    frame = load_builtin(dataset).frame
    names = [f"institution-{i + 1}" for i in range(institutions)]
    order = np.random.default_rng(0).permutation(len(frame))
    (work / "policy.toml").write_text("max-epsilon = 100.0\n")
    for name, rows in zip(names, np.array_split(order, institutions), strict=True):
        (work / name).mkdir()
        frame.iloc[np.sort(rows)].to_csv(work / name / "records.csv", index=False)
        subprocess.run([client, "keys", str(work / name)], check=True, capture_output=True)
        pub = str(work / name / "node.key.pub")
        subprocess.run([server, "admit", str(fed), pub, "--name", name], check=True, capture_output=True)
    processes: list[subprocess.Popen[bytes]] = []
    logs = open(work / "processes.log", "ab")  # noqa: SIM115 - closed below
    try:
        processes.append(subprocess.Popen([server, "start", str(fed)], stdout=logs, stderr=logs))
        deadline = time.monotonic() + 60
        while not healthy(f"127.0.0.1:{port}", fed / "certs" / "ca.crt"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not start; see {work / 'processes.log'}")
            time.sleep(0.2)
        for name in names:
            argv = [client, "start", "--server", f"127.0.0.1:{port}", "--ca", str(fed / "certs" / "ca.crt")]
            argv += ["--key", str(work / name / "node.key"), "--data", str(work / name / "records.csv")]
            argv += ["--schema", str(fed / "schema.toml"), "--policy", str(work / "policy.toml")]
            argv += ["--state-dir", str(work / name / "state"), "--name", name, "--port", str(free_port())]
            argv += [] if warm else ["--no-warm-trainer"]
            processes.append(subprocess.Popen(argv, stdout=logs, stderr=logs))
        started = time.monotonic()
        subprocess.run([server, "run", str(fed), "--rounds", str(rounds)], check=True, stdout=logs, stderr=logs)
        wall = time.monotonic() - started
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
        logs.close()
    (metrics,) = fed.glob("runs/*/metrics.csv")
    elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(metrics.open())]
    per_round = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    return {
        "seconds_per_round": per_round,
        "median_seconds_per_round": float(np.median(per_round[1:] if len(per_round) > 1 else per_round)),
        "run_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--dataset", default="german-credit")
    parser.add_argument("--cold", action="store_true", help="Also measure without warm trainers, for comparison.")
    parser.add_argument("--out", type=Path, default=None, help="Write the result as JSON here.")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "benchmark": "deployment round latency (TLS, node auth, SecAgg+)",
        "machine": machine(),
        "institutions": args.institutions,
        "rounds": args.rounds,
        "dataset": args.dataset,
    }
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as scratch:
        result |= measure(args.rounds, args.institutions, args.dataset, Path(scratch) / "warm")
        print(f"warm trainers: median {result['median_seconds_per_round']:.1f} s per round", flush=True)
        if args.cold:
            result["cold"] = measure(args.rounds, args.institutions, args.dataset, Path(scratch) / "cold", warm=False)
            print(f"cold ClientApps: median {result['cold']['median_seconds_per_round']:.1f} s per round", flush=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
