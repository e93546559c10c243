"""Benchmarks: figures, never pass/fail. Each script prints its result as JSON and may write it to a file."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine(**extra: Any) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": os.getloadavg()[0],
        **extra,
    }


def emit(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as JSON; also write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")


def seconds_per_round(run_dir: Path) -> list[float]:
    """Each round's seconds, from the run directory's ``metrics.csv``."""
    with (run_dir / "metrics.csv").open(encoding="utf-8") as rows:
        elapsed = [float(row["elapsed_s"]) for row in csv.DictReader(rows)]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
