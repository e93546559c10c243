"""An institution's evaluation log: which (run, round) it has evaluated, so that it answers each once.

Evaluations spend no privacy budget, yet each one answers a question about the
held-out records (the loss of a model the coordinator chose). A deployed institution
therefore evaluates a round at most once, and only a round its privacy ledger shows it
trained in (``PrivacyPolicy.one_evaluation_per_trained_round``): the number of
evaluations over every run is then bounded by the rounds it spent budget on. The log is
one JSON file per dataset (``STATE_DIR/evaluations/FINGERPRINT.json``); a claim reads,
checks and writes it under an exclusive lock, atomically, before any score is computed,
so two processes of one institution (its warm trainer and a ClientApp) cannot both
answer the same round, and a crash after the claim leaves the round answered.
"""

from __future__ import annotations

import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedsilo.common.atomic import write_text_atomically
from fedsilo.common.errors import LedgerError
from fedsilo.common.ledger import PrivacyLedger

EVALUATIONS_DIR = "evaluations"
LOCK = ".evaluations.lock"
LOG_VERSION = 1


@dataclass(frozen=True)
class Evaluation:
    """One round an institution evaluated (and so may not evaluate again)."""

    run_id: str
    round: int
    recorded_at: str


def claim_evaluation(
    state_dir: Path, fingerprint: str, *, run_id: str, server_round: int, recorded_at: str
) -> str | None:
    """Record that this institution evaluates ``(run_id, server_round)`` now; why it may not (None: it may).

    It may when its ledger has a trained round ``(run_id, server_round)`` for this dataset
    and the log has no evaluation of it yet. The check and the record happen under one
    exclusive lock, and the record is written (atomically) before this returns None.
    """
    path = Path(state_dir) / EVALUATIONS_DIR / f"{fingerprint}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            done = _read(path, fingerprint)
            if any(e.run_id == run_id and e.round == server_round for e in done):
                return f"it has already evaluated round {server_round} of run {run_id!r} and evaluates each round once"
            trained = PrivacyLedger.for_dataset(state_dir, fingerprint).entries
            if not any(e.run_id == run_id and e.round == server_round for e in trained):
                return f"it did not train in round {server_round} of run {run_id!r} and evaluates only such rounds"
            _write(path, fingerprint, [*done, Evaluation(run_id, server_round, recorded_at)])
            return None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def evaluations(state_dir: Path, fingerprint: str) -> list[Evaluation]:
    """Every round evaluated on this dataset, in the order they were claimed."""
    return _read(Path(state_dir) / EVALUATIONS_DIR / f"{fingerprint}.json", fingerprint)


def _read(path: Path, fingerprint: str) -> list[Evaluation]:
    if not path.exists():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        done = [Evaluation(**e) for e in raw["evaluations"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LedgerError(
            f"evaluation log {path} cannot be read ({err}); it records which rounds were already "
            "evaluated: restore it from a backup rather than delete it"
        ) from err
    if raw.get("dataset_fingerprint") != fingerprint:
        raise LedgerError(f"evaluation log {path} belongs to dataset {raw.get('dataset_fingerprint')!r}")
    return done


def _write(path: Path, fingerprint: str, done: list[Evaluation]) -> None:
    payload = {"version": LOG_VERSION, "dataset_fingerprint": fingerprint, "evaluations": [asdict(e) for e in done]}
    write_text_atomically(path, json.dumps(payload, indent=2))
