"""Wall time of the researchers' reference sweep: 6 epsilons x 3 seeds, breast cancer, 4 hospitals, 20 rounds.

Runs ``fedsilo-simulate sweep`` as a user would (in-process engine) and reports
its wall time, start-up included. A benchmark: it never fails on a time.

    python -m fedsilo.simulations.benchmarks.sweep_time --out bench/sweep.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsilo.simulations.benchmarks import emit, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="0.5,1,2,4,8,inf")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-") as scratch:
        argv = [str(Path(sys.executable).parent / "fedsilo-simulate"), "sweep", "--dataset", "breast-cancer"]
        argv += ["--epsilons", args.epsilons, "--seeds", args.seeds, "--institutions", "4"]
        argv += ["--rounds", str(args.rounds), "--out", str(Path(scratch) / "sweep")]
        started = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)
        wall = time.monotonic() - started
    result = {
        "benchmark": f"Sweep {args.epsilons} x seeds {args.seeds}, breast-cancer, 4 hospitals, {args.rounds} rounds",
        "wall_s": wall,
        "machine": machine(),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
