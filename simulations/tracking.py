"""Experiment tracking: a run's per-round metrics and epsilon, and a sweep's results, as TensorBoard event files.

``fedsilo-simulate run --tensorboard DIR`` writes each round as it ends (watch it
live with ``tensorboard --logdir DIR``); ``sweep --tensorboard DIR`` writes one
TensorBoard run per federation (``DIR/<run_id>``: its rounds and every method's
final scores) as each arrives, and the sweep's summary (``DIR/sweep``) at the
end. The writer is torch's ``SummaryWriter``; it needs the ``tensorboard``
package, the optional extra ``fedsilo[tracking]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from fedsilo.common.errors import ConfigError

EXTRA = "tracking"
ROUND_SKIP = ("round",)  # the step, not a scalar
FINAL = ("auc", "average_precision", "balanced_accuracy", "accuracy", "loss", "epsilon", "attack_auc")


def summary_writer(log_dir: Path) -> Any:
    """torch's TensorBoard ``SummaryWriter`` writing to ``log_dir``; a clear error if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the 'tensorboard' package, which is not installed; install fedsilo's "
            f"optional extra '{EXTRA}': pip install 'fedsilo[{EXTRA}]' (or pip install 'tensorboard>=2.16')"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def _scalars(row: dict[str, Any], skip: tuple[str, ...] = ROUND_SKIP) -> dict[str, float]:
    """A row's finite numbers (inf epsilon of a run without DP, text and empty values left out)."""
    out = {}
    for key, value in row.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class RunTracker:
    """One federation's rounds, written (and flushed) as each ends: ``round/<metric>`` at step = round."""

    def __init__(self, log_dir: Path) -> None:
        self.writer = summary_writer(log_dir)

    def round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, value in _scalars(row).items():
            self.writer.add_scalar(f"round/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class SweepTracker:
    """A sweep: one TensorBoard run per federation, and the sweep's summary at the end."""

    def __init__(self, log_dir: Path) -> None:
        summary_writer(log_dir).close()  # fail before the sweep starts if tensorboard is missing
        self.log_dir = Path(log_dir)

    def task(self, run_id: str, rounds: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        """A finished federation: its rounds (``round/<metric>``) and each method's scores (``final/<method>/...``)."""
        writer = summary_writer(self.log_dir / run_id)
        try:
            for row in rounds:
                for key, value in _scalars(row, skip=("round", "seed", "target_epsilon", "noise_multiplier")).items():
                    writer.add_scalar(f"round/{key}", value, int(row["round"]))
            for row in results:
                scores = {k: row.get(k) for k in FINAL}
                for key, value in _scalars(scores, skip=()).items():
                    writer.add_scalar(f"final/{row['method']}/{key}", value, 0)
        finally:
            writer.close()

    def summary(self, summary: pd.DataFrame, metric: str) -> None:
        """The sweep's summary table (as text) and each method's mean lead metric per privacy level.

        The scalars ``sweep/<method>/<metric>_mean`` take one step per privacy level, in the
        table's order; the text ``sweep/summary`` says which level each step is.
        """
        writer = summary_writer(self.log_dir / "sweep")
        try:
            levels = list(dict.fromkeys(summary["level"]))
            for row in summary.itertuples(index=False):
                value = getattr(row, f"{metric}_mean")
                if isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(f"sweep/{row.method}/{metric}_mean", float(value), levels.index(row.level))
            steps = "\n".join(f"step {i}: {level}" for i, level in enumerate(levels))
            writer.add_text(
                "sweep/summary", f"{steps}\n\n    " + summary.to_string(index=False).replace("\n", "\n    ")
            )
        finally:
            writer.close()
