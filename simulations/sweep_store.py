"""A sweep's durable state: its spec, one file per finished task, one per failed task (resumable sweeps).

Layout under the sweep's ``--out``::

    sweep.json                 the spec that decides the numbers (``SweepSpec.identity``)
    tasks/<run_id>.json        one finished task: its tidy rows and where it ran
    failures/<run_id>.json     one failed task: its error (removed when a rerun succeeds)

Every file is written whole or not at all (a temp file beside it, then
``os.replace``), after its task completed, so a sweep killed at any moment
leaves only finished tasks behind. Started again with the same ``--out``, a
sweep skips them and reruns the rest; a different spec is refused, naming the
keys that differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsilo.common.atomic import write_text_atomically
from fedsilo.common.errors import ConfigError
from fedsilo.simulations.sweep_spec import SweepSpec, Task

SPEC_FILE = "sweep.json"
FORMAT = 1


@dataclass(frozen=True)
class TaskRecord:
    """A finished task as stored: its tidy rows and where and how long it ran."""

    run_id: str
    results: list[dict[str, Any]]
    institutions: list[dict[str, Any]]
    rounds: list[dict[str, Any]]
    ran_on: dict[str, Any]


def _plain(value: Any) -> Any:
    """numpy scalars as Python ones (JSON keeps floats exactly, inf and nan included)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a sweep's task file")


def write_json_atomically(path: Path, content: Any) -> None:
    """Write ``content`` as JSON to ``path`` whole or not at all (temp file, fsync, os.replace)."""
    write_text_atomically(path, json.dumps(content, default=_plain, indent=1))


class SweepStore:
    """The finished and failed tasks of one sweep directory."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.tasks_dir = self.out_dir / "tasks"
        self.failures_dir = self.out_dir / "failures"

    @staticmethod
    def holds_sweep(out_dir: Path) -> bool:
        """Whether ``out_dir`` is a (finished or interrupted) sweep's directory."""
        return (Path(out_dir) / SPEC_FILE).is_file()

    @classmethod
    def open(cls, out_dir: Path, spec: SweepSpec) -> SweepStore:
        """Start a sweep in ``out_dir``, or resume the one there; refuse a sweep with another spec."""
        store = cls(out_dir)
        path = store.out_dir / SPEC_FILE
        wanted = json.loads(json.dumps(spec.identity()))  # tuples as lists, as read back
        if path.is_file():
            stored = json.loads(path.read_text(encoding="utf-8"))
            found = stored.get("spec", {})
            differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            if differ:
                changes = "; ".join(
                    f"{k}: {found.get(k, '(unset)')!r} there, {wanted.get(k, '(unset)')!r} now" for k in differ
                )
                raise ConfigError(
                    f"{store.out_dir} holds a sweep with another spec ({changes}); rerun it with the same "
                    "settings to resume it, or choose another --out"
                )
        else:
            write_json_atomically(path, {"format": FORMAT, "spec": wanted})
        return store

    def finished(self) -> dict[str, TaskRecord]:
        """Every finished task, by run id."""
        records = {}
        for path in sorted(self.tasks_dir.glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            records[data["run_id"]] = TaskRecord(
                data["run_id"], data["results"], data["institutions"], data["rounds"], data.get("ran_on", {})
            )
        return records

    def save(self, task: Task, record: TaskRecord) -> None:
        """Store a finished task (and forget an earlier failure of it)."""
        content = {"format": FORMAT, "run_id": task.run_id, "ran_on": record.ran_on}
        content |= {"results": record.results, "institutions": record.institutions, "rounds": record.rounds}
        write_json_atomically(self.tasks_dir / f"{task.run_id}.json", content)
        (self.failures_dir / f"{task.run_id}.json").unlink(missing_ok=True)

    def fail(self, task: Task, error: str, details: str) -> None:
        """Store a task's failure: its error in one line, and the details (a traceback)."""
        content = {"format": FORMAT, "run_id": task.run_id, "error": error, "details": details}
        write_json_atomically(self.failures_dir / f"{task.run_id}.json", content)

    def failures(self) -> pd.DataFrame:
        """One row per failed task: run_id, error, details."""
        rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.failures_dir.glob("*.json"))]
        return pd.DataFrame([{k: r[k] for k in ("run_id", "error", "details")} for r in rows])
