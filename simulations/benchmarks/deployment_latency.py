"""Round latency of a real deployment: a SuperLink and 3 SuperNodes over TLS with SecAgg+, on 127.0.0.1.

Runs the same commands a coordinator and institutions run (``fedsilo-server
init/admit/start/run``, ``fedsilo-client keys/start``) in a temporary directory
on free ports, and reports seconds per round from the run's ``metrics.csv``.
A benchmark, not a test: it prints figures and writes JSON; it never fails on
a time.

    python -m fedsilo.simulations.benchmarks.deployment_latency --rounds 3 --out bench/deployment.json
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.common.datasets import load_builtin
from fedsilo.runtime.processes import executable, free_port
from fedsilo.server.processes import healthy
from fedsilo.simulations.benchmarks import emit, machine, seconds_per_round

# ServerApp log lines that open and close each of a round's five message exchanges.
MARKERS = (
    ("stage 0 (keys)", "[Stage 0] Sending", "[Stage 0] Received"),
    ("stage 1 (shares)", "[Stage 1] Forwarding", "[Stage 1] Received"),
    ("stage 2 (fit, masked)", "[Stage 2] Forwarding", "[Stage 2] Received"),
    ("stage 3 (unmask)", "[Stage 3] Requesting", "[Stage 3] Received"),
    ("evaluate", "configure_evaluate", "aggregate_evaluate"),
)


def last_round_phases(lines: list[tuple[float, str]]) -> list[dict[str, Any]]:
    """Seconds in each exchange of the last round, and before each (the coordinator's share).

    ``lines`` are the streamed ServerApp log lines with the time each arrived;
    Flower uploads the log about once a second, so each figure is good to about 1 s.
    """
    starts = [i for i, (_, text) in enumerate(lines) if "[ROUND " in text]
    if not starts:
        return []
    tail = lines[starts[-1] :]
    previous, out = tail[0][0], []
    for name, opening, closing in MARKERS:
        opened = next((t for t, text in tail if opening in text), None)
        closed = next((t for t, text in tail if closing in text), None)
        if opened is None or closed is None:
            continue
        out.append({"exchange": name, "before_s": opened - previous, "exchange_s": closed - opened})
        previous = closed
    return out


def measure(rounds: int, institutions: int, dataset: str, work: Path, *, warm: bool = True) -> dict[str, Any]:
    """Set up a federation, run ``rounds`` rounds, return per-round seconds.

    ``warm``: each institution runs its warm trainer and forks its ClientApp
    processes warm (the defaults); otherwise every message starts a fresh
    ``flwr-clientapp`` process that imports everything it needs.
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
            # Cold: Flower's own launcher too, a fresh flwr-clientapp process for every message.
            env = {**os.environ, "FEDSILO_FORKING_CLIENTAPPS": "1" if warm else "0"}
            processes.append(subprocess.Popen(argv, stdout=logs, stderr=logs, env=env))
        started = time.monotonic()
        argv = [server, "run", str(fed), "--rounds", str(rounds), "--verbose"]
        lines: list[tuple[float, str]] = []
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as run:
            assert run.stdout is not None
            for line in run.stdout:
                lines.append((time.monotonic(), line))
                logs.write(line.encode())
        if run.returncode != 0:
            raise RuntimeError(f"the run failed; see {work / 'processes.log'}")
        wall = time.monotonic() - started
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)
        logs.close()
    (metrics,) = fed.glob("runs/*/metrics.csv")
    per_round = seconds_per_round(metrics.parent)
    return {
        "load_average_1m_after": os.getloadavg()[0],
        "last_round_exchanges": last_round_phases(lines),
        "seconds_per_round": per_round,
        "median_seconds_per_round": float(np.median(per_round[1:] if len(per_round) > 1 else per_round)),
        "run_wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--dataset", default="german-credit")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="Also measure with a cold process per message (no warm trainer or fork), for comparison.",
    )
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
        print(
            f"warm (trainer + forked ClientApps): median {result['median_seconds_per_round']:.1f} s per round",
            flush=True,
        )
        for e in result["last_round_exchanges"]:
            print(f"  last round: {e['before_s']:.1f} s, then {e['exchange']} {e['exchange_s']:.1f} s", flush=True)
        if args.cold:
            result["cold"] = measure(args.rounds, args.institutions, args.dataset, Path(scratch) / "cold", warm=False)
            print(
                f"cold (a fresh process per message): median {result['cold']['median_seconds_per_round']:.1f} s",
                flush=True,
            )
    emit(result, args.out)


if __name__ == "__main__":
    main()
