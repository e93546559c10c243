"""One institution's round against its size: seconds per step of the round and peak memory, 10^4 to 10^6 records.

The institution reads a CSV of German credit rows drawn with replacement (the
bank table the federation's schema encodes), and does what a round does at an
institution, each step timed on its own: read and encode the table by the
schema (``read_table``, ``Schema.transform``), fingerprint the records (the
ledger's key, ``records_fingerprint``), split off its held-out records, plan the
round and account for it (``plan_round``, ``epsilon_spent``), train with DP-SGD
(``train_round``), and build the vector SecAgg+ masks
(``secaggplus_client_vector``) at its aggregation weight (records capped at
``secagg-max-weight``). Everything runs with the default run settings and one
torch thread, as a ClientApp trains. Each size runs in a fresh process, so its
peak resident memory (``ru_maxrss``, read after every step) is its own; the CSV
is written beforehand, by another process. A size that runs past ``--max-seconds``
reports the steps it finished. Also reported: the trained model's largest
parameter against SecAgg+'s clipping range (parameters beyond
``clipping_range / ratio`` are clipped). A benchmark: it prints figures and
writes JSON; it never fails on a time.

    python -m fedsilo.simulations.benchmarks.institution_size --sizes 10000,100000,1000000 \
        --out bench/institution_size.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.simulations.benchmarks import emit, machine

PHASES = ("load_encode", "fingerprint", "split", "plan_account", "dp_train", "secagg_vector")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _report(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def measure_one(path: Path, seed: int) -> None:
    """Time one institution's round on the table at ``path``; print one JSON line per step."""
    import torch

    from fedsilo.client.institution import records_fingerprint, split_holdout
    from fedsilo.client.mods import seeded_global_numpy
    from fedsilo.common.accounting import DPSGDEvent, epsilon_spent
    from fedsilo.common.datasets import builtin_schema_path, read_table
    from fedsilo.common.models import build_model, get_weights
    from fedsilo.common.schema import Schema
    from fedsilo.common.settings import RunSettings
    from fedsilo.common.training import plan_round, train_round
    from fedsilo.server.aggregation import secaggplus_client_vector

    torch.set_num_threads(1)
    settings = RunSettings()
    schema = Schema.load(builtin_schema_path("german-credit"))
    _report({"phase": "start", "peak_rss_mb": _peak_mb()})

    def timed(phase: str, started: float, **extra: Any) -> None:
        _report({"phase": phase, "seconds": time.perf_counter() - started, "peak_rss_mb": _peak_mb(), **extra})

    started = time.perf_counter()
    inputs, labels = schema.transform(read_table(path), source=str(path))
    timed("load_encode", started, records=len(labels), columns=int(inputs.shape[1]))
    started = time.perf_counter()
    records_fingerprint(inputs, labels)
    timed("fingerprint", started)
    started = time.perf_counter()
    train_x, _, train_y, _ = split_holdout(inputs, labels, settings)
    del inputs, labels
    timed("split", started, training_records=len(train_y))
    started = time.perf_counter()
    plan = plan_round(
        num_examples=len(train_y), train=settings.train, privacy=settings.privacy, planned_rounds=settings.rounds
    )
    epsilon = epsilon_spent(
        [DPSGDEvent(plan.noise_multiplier, plan.sample_rate, plan.steps)], delta=settings.privacy.delta
    )
    timed("plan_account", started, steps=plan.steps, noise_multiplier=plan.noise_multiplier, epsilon=epsilon)
    started = time.perf_counter()
    model = build_model(settings.train, schema, seed=settings.seed)
    train_round(
        model,
        train_x,
        train_y,
        plan=plan,
        train=settings.train,
        max_grad_norm=settings.privacy.max_grad_norm,
        seed=seed,
    )
    weights = get_weights(model)
    timed("dp_train", started, seconds_per_step=(time.perf_counter() - started) / plan.steps)
    started = time.perf_counter()
    weight = settings.secagg.aggregation_weight(len(train_y))
    with seeded_global_numpy(seed):
        secaggplus_client_vector(weights, weight, settings.secagg)
    ratio = weight / settings.secagg.max_weight
    largest = max(float(np.abs(w).max()) for w in weights)
    clipped = sum(int((np.abs(w) * ratio > settings.secagg.clipping_range).sum()) for w in weights)
    timed(
        "secagg_vector",
        started,
        aggregation_weight=weight,
        largest_parameter=largest,
        clipped_parameters=clipped,
        parameters=sum(w.size for w in weights),
    )


def write_table(records: int, path: Path, seed: int) -> None:
    """A CSV of ``records`` German credit rows drawn with replacement."""
    from fedsilo.common.datasets import DATA_DIR, read_table

    frame = read_table(DATA_DIR / "german_credit.csv")
    rows = np.random.default_rng(seed).integers(0, len(frame), records)
    frame.iloc[rows].to_csv(path, index=False)


def run_size(records: int, folder: Path, seed: int, max_seconds: float | None) -> dict[str, Any]:
    """Write the table, then measure it in a fresh process; what it finished if it ran out of time.

    The table is written by a process of its own too: on Linux a child's
    ``ru_maxrss`` starts from its parent's resident size, which must stay small.
    """
    path = folder / f"german_credit_{records}.csv"
    command = [sys.executable, "-m", "fedsilo.simulations.benchmarks.institution_size", "--seed", str(seed)]
    subprocess.run([*command, "--write", str(path), "--sizes", str(records)], check=True)
    command += ["--one", str(path)]
    result: dict[str, Any] = {"records": records, "csv_mb": path.stat().st_size / 2**20}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds, check=False)
        output, error = done.stdout, done.stderr if done.returncode else ""
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        error = f"stopped after {max_seconds:g} s"
    finally:
        path.unlink()
    for line in output.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            result[row.pop("phase")] = row
    if error:
        result["error"] = error[-400:]
    timed = [result[p]["seconds"] for p in PHASES if p in result]
    if len(timed) == len(PHASES):
        result["round_s"] = sum(timed)
        result["dominant"] = max(PHASES, key=lambda p: result[p]["seconds"])
    result["peak_rss_mb"] = max((r["peak_rss_mb"] for r in result.values() if isinstance(r, dict)), default=None)
    print(f"{records:,} records: {_summary(result)}", flush=True)
    return result


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{p} {result[p]['seconds']:.2f} s" for p in PHASES if p in result]
    if result["peak_rss_mb"] is not None:
        parts.append(f"peak RSS {result['peak_rss_mb']:.0f} MB")
    if "error" in result:
        parts.append(result["error"])
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="Comma-separated record counts.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=None, help="Stop a size after this long (default: never).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)  # a child: measure one table
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)  # a child: write one table
    args = parser.parse_args()
    if args.one is not None:
        measure_one(args.one, args.seed)
        return
    if args.write is not None:
        write_table(int(args.sizes), args.write, args.seed)
        return
    from fedsilo.common.settings import RunSettings

    defaults = RunSettings()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        results = [run_size(int(n), Path(folder), args.seed, args.max_seconds) for n in args.sizes.split(",")]
    emit(
        {
            "benchmark": "One institution's round against its records (German credit resampled, default settings)",
            "machine": machine(threads=1),
            "settings": {
                "local_epochs": defaults.train.local_epochs,
                "batch_size": defaults.train.batch_size,
                "target_epsilon": defaults.privacy.target_epsilon,
                "planned_rounds": defaults.rounds,
                "grad_sample_mode": defaults.train.grad_sample_mode,
                "secagg_max_weight": defaults.secagg.max_weight,
                "secagg_clipping_range": defaults.secagg.clipping_range,
            },
            "results": results,
            "wall_s": time.perf_counter() - started,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
