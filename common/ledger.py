"""The privacy ledger: one immutable record per round an institution trained.

The ledger is data (one JSON file per dataset in the institution's state
directory); epsilon is always computed from the whole ledger, so it accumulates
across rounds and runs and survives a restart. Writes are atomic: a crash
mid-write leaves the previous ledger intact.

A round is one of two mechanisms: ``"gaussian"``, local DP-SGD (each institution adds the
full noise to its own update), or ``"skellam"``, one distributed-DP round (one aggregated
DP-SGD step; the institution adds a share of Skellam noise inside the SecAgg+ sum). A
distributed round records both the variance it is accounted with (its own share plus the
honest others it counts on) and its own share alone, so the worst case (nobody else
honest) can always be recomputed. A ledger with distributed rounds is composed by RDP (see
``fedsilo.common.accounting``). Files written before the mechanism was recorded are all
``"gaussian"``.

Epsilon is the accountant of record's (``fedsilo.common.accounting.ACCOUNTANT_OF_RECORD``,
PLD); the file names it and its parameters under "accountant", so that its
epsilon can be recomputed from the file alone. The name is informative: reading
a ledger (one written before it was recorded, say) always uses the accountant of
record.

The neighbouring relation (add/remove or replace-one) is not recorded: an entry records
the mechanism, and the relation is chosen when the ledger is composed (``neighbouring``;
an institution's is its policy's, ``fedsilo.client.policy``).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedsilo.common.accounting import (
    ACCOUNTANT_OF_RECORD,
    ADD_REMOVE,
    DPSGDEvent,
    SkellamEvent,
    epsilon_spent,
    get_accountant,
)
from fedsilo.common.atomic import write_text_atomically
from fedsilo.common.errors import LedgerError

LEDGER_VERSION = 1
BUDGET_LOCK = ".budget.lock"  # one lock over every ledger of a state directory
MECHANISMS = ("gaussian", "skellam", "secure-evaluation")
SKELLAM_MECHANISMS = ("skellam", "secure-evaluation")  # accounted as Skellam releases


@dataclass(frozen=True)
class LedgerEntry:
    """One round an institution trained and released an update for."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    recorded_at: str
    # "gaussian": local DP-SGD rounds; "skellam": a distributed-DP round; "secure-evaluation": one
    # release of noisy held-out counts (fedsilo.common.secure_evaluation: sample rate 1, sensitivities 1)
    mechanism: str = "gaussian"
    # distributed DP only (mechanism "skellam"): steps == 1 per round, noise_multiplier = proposed total sigma
    variance: float = 0.0  # the Skellam variance accounted (guaranteed total: own share + honest others counted on)
    own_variance: float = 0.0  # this institution's own share alone (the worst case: nobody else honest)
    l2_sensitivity: float = 0.0
    l1_sensitivity: float = 0.0
    scale: float = 0.0
    min_honest: int = 0
    counted_honest: int = 0
    sample: int = 0  # institutions sampled (SecAgg+ setup)
    threshold: int = 0  # SecAgg+ reconstruction threshold

    def event(self) -> DPSGDEvent | SkellamEvent:
        """The event this round represents, for the accountant (a distributed round: its guaranteed variance)."""
        if self.mechanism in SKELLAM_MECHANISMS:
            return SkellamEvent(self.sample_rate, self.variance, self.l2_sensitivity, self.l1_sensitivity, self.steps)
        return DPSGDEvent(self.noise_multiplier, self.sample_rate, self.steps)

    def worst_case_event(self) -> DPSGDEvent | SkellamEvent:
        """The event if no other institution was honest: a distributed round's own share alone; else ``event()``."""
        if self.mechanism in SKELLAM_MECHANISMS:
            return SkellamEvent(
                self.sample_rate, self.own_variance, self.l2_sensitivity, self.l1_sensitivity, self.steps
            )
        return self.event()

    def problem(self) -> str | None:
        """What makes this entry unaccountable, if anything."""
        if self.mechanism not in MECHANISMS:
            return f"mechanism must be one of {', '.join(map(repr, MECHANISMS))}. Found {self.mechanism!r}."
        if self.mechanism in SKELLAM_MECHANISMS and not (isinstance(self.variance, int | float) and self.variance >= 0):
            return f"a {self.mechanism} round must record a variance >= 0 (0: no DP). Found {self.variance}."
        return None


@dataclass(frozen=True)
class PrivacyLedger:
    """All rounds trained on one dataset, in order; immutable."""

    path: Path
    dataset_fingerprint: str
    entries: tuple[LedgerEntry, ...] = ()

    @classmethod
    def for_dataset(cls, state_dir: Path, fingerprint: str) -> PrivacyLedger:
        """Open the ledger of a dataset in a state directory (empty if new)."""
        path = Path(state_dir) / "ledgers" / f"{fingerprint}.json"
        if not path.exists():
            return cls(path=path, dataset_fingerprint=fingerprint)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            entries = tuple(LedgerEntry(**e) for e in raw["entries"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise LedgerError(
                f"privacy ledger {path} cannot be read ({err}); it is the record of "
                "privacy already spent: restore it from a backup rather than delete it"
            ) from err
        problems = [
            f"entry {i} (run {e.run_id!r}, round {e.round}): {problem}"
            for i, e in enumerate(entries)
            if (problem := e.problem()) is not None
        ]
        if problems:
            raise LedgerError(
                f"privacy ledger {path} has entries that cannot be accounted: {'; '.join(problems)} "
                "It is the record of privacy already spent: restore it from a backup rather than edit it."
            )
        if raw.get("dataset_fingerprint") != fingerprint:
            raise LedgerError(
                f"privacy ledger {path} belongs to dataset {raw.get('dataset_fingerprint')!r}, not {fingerprint!r}"
            )
        return cls(path=path, dataset_fingerprint=fingerprint, entries=entries)

    @classmethod
    @contextmanager
    def locked(cls, state_dir: Path, fingerprint: str) -> Iterator[PrivacyLedger]:
        """The ledger, read under the state directory's exclusive budget lock, held until the block ends.

        One lock covers every ledger in the state directory (``BUDGET_LOCK``), because
        the budget composes them all: a round checks the budget, trains and records
        inside one such block, so two rounds on the same institution's records (two
        SuperNodes sharing a state directory, or two datasets of one institution)
        cannot both pass the check and together overspend.
        """
        lock_path = Path(state_dir) / "ledgers" / BUDGET_LOCK
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield cls.for_dataset(state_dir, fingerprint)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @classmethod
    def others(cls, state_dir: Path, fingerprint: str) -> list[PrivacyLedger]:
        """Every other dataset's ledger in the same state directory (consistent inside ``locked``)."""
        paths = sorted((Path(state_dir) / "ledgers").glob("*.json"))
        return [cls.for_dataset(state_dir, p.stem) for p in paths if p.stem != fingerprint]

    @classmethod
    def all(cls, state_dir: Path) -> list[PrivacyLedger]:
        """Every dataset's ledger in a state directory, in fingerprint order."""
        paths = sorted((Path(state_dir) / "ledgers").glob("*.json"))
        return [cls.for_dataset(state_dir, p.stem) for p in paths]

    def epsilon(self, *, delta: float, worst_case: bool = False, neighbouring: str = ADD_REMOVE) -> float:
        """Epsilon spent on this dataset over every recorded round, by the accountant of record.

        ``worst_case``: each distributed round with the institution's own noise share alone.
        ``neighbouring``: the relation accounted for (``"add-remove"`` or ``"replace-one"``).
        """
        return composed_epsilon([self], delta=delta, worst_case=worst_case, neighbouring=neighbouring)

    @property
    def distributed_rounds(self) -> int:
        """How many of the rounds were distributed DP (mechanism "skellam")."""
        return sum(e.mechanism == "skellam" for e in self.entries)

    def append(self, entry: LedgerEntry) -> PrivacyLedger:
        """Persist ``entry`` atomically and return the ledger that includes it."""
        updated = PrivacyLedger(self.path, self.dataset_fingerprint, (*self.entries, entry))
        updated._write()
        return updated

    def _write(self) -> None:
        """The whole ledger, atomically: one entry a line (Python's C JSON encoder; indent would be its slow one)."""
        head = {
            "version": LEDGER_VERSION,
            "dataset_fingerprint": self.dataset_fingerprint,
            "accountant": get_accountant(ACCOUNTANT_OF_RECORD).record(),
        }
        entries = ",\n".join("    " + json.dumps(_row(e)) for e in self.entries)
        text = (
            json.dumps(head, indent=2)[:-2] + ',\n  "entries": [\n' + entries + ("\n  ]\n}\n" if entries else "]\n}\n")
        )
        write_text_atomically(self.path, text)


def _row(entry: LedgerEntry) -> dict[str, Any]:
    """An entry's fields (``asdict`` without its deep copy: every field is a scalar)."""
    return {f.name: getattr(entry, f.name) for f in fields(entry)}


def composed_epsilon(
    ledgers: list[PrivacyLedger], *, delta: float, worst_case: bool = False, neighbouring: str = ADD_REMOVE
) -> float:
    """Epsilon of every round in ``ledgers`` composed: what an institution's budget is checked against.

    ``worst_case``: each distributed round accounted with the institution's own noise share
    alone (no other institution honest), instead of the guaranteed total it counted on.
    ``neighbouring``: the relation accounted for (the institution's policy's when enforced).
    """
    events = [e.worst_case_event() if worst_case else e.event() for ledger in ledgers for e in ledger.entries]
    return epsilon_spent(events, delta=delta, accountant=ACCOUNTANT_OF_RECORD, neighbouring=neighbouring)
