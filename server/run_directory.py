"""The run directory: metrics.csv, checkpoints, the final model and report.json.

This layout is a contract that later tools read: ``metrics.csv`` has one row per
round; ``report.json`` has ``rounds_completed``, ``secure_aggregation``,
``final_metrics`` and ``institutions`` (name, num_examples, epsilon, delta, ledger, refusals, and
``rejected``: the malformed replies dropped unused, each with its round, stage and reason).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.common.accounting import ADD_REMOVE, DPSGDEvent, SkellamEvent, epsilon_spent
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import RunSettings

# The global model's scores on the held-out records (weighted means over institutions), as report.json's final_metrics.
SCORE_COLUMNS = ("accuracy", "auc", "average_precision", "balanced_accuracy", "loss")
METRIC_COLUMNS = (
    "round",
    *SCORE_COLUMNS,
    "max_epsilon",
    "institutions_trained",
    "institutions_refused",
    "elapsed_s",
    # The secure evaluation's federation-wide DP estimate (fedsilo.common.secure_evaluation), of the
    # model of round dp_model_round (the previous round's): noisy counts summed under SecAgg+.
    "dp_model_round",
    "dp_accuracy",
    "dp_accuracy_sd",
    "dp_auc",
    "dp_noise_sd",
)


@dataclass
class InstitutionRecord:
    """What the coordinator learned about one institution, all from clear-text metrics.

    ``epsilon`` is what the institution last reported: its spend in this run (its rounds of
    this run composed, at its own delta), not what it spent in other runs or federations,
    which its budget also counts. ``epsilon_this_run`` in the report is the coordinator's
    own composition of the rounds it booked, for the neighbouring relation the institution
    names in its replies (``neighbouring``; its policy's, replace-one by default when deployed).
    """

    name: str
    num_examples: int = 0
    epsilon: float = 0.0
    delta: float = 0.0
    neighbouring: str = ADD_REMOVE  # the relation its epsilon is for, as its last reply named it
    ledger: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # malformed replies, dropped unused

    def as_report(self) -> dict[str, Any]:
        events = [_event(e) for e in self.ledger]
        relation = self.neighbouring
        run_epsilon = epsilon_spent(events, delta=self.delta, neighbouring=relation) if self.delta > 0 else 0.0
        return {
            "name": self.name,
            "num_examples": self.num_examples,
            "epsilon": self.epsilon,
            "epsilon_this_run": run_epsilon,
            "delta": self.delta,
            "neighbouring": relation,
            "ledger": self.ledger,
            "refusals": self.refusals,
            "rejected": self.rejected,
        }


def _event(row: Mapping[str, Any]) -> DPSGDEvent | SkellamEvent:
    """The accounting event of one booked round: local DP-SGD, or a distributed (Skellam) round."""
    if row.get("mechanism") in ("skellam", "secure-evaluation"):
        return SkellamEvent(
            row["sample_rate"], row["variance"], row["l2_sensitivity"], row["l1_sensitivity"], row["steps"]
        )
    return DPSGDEvent(row["noise_multiplier"], row["sample_rate"], row["steps"])


def _json_safe(value: Any) -> Any:
    """JSON has no infinity: replace every non-finite float in nested data by its string ("inf")."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class RunDirectory:
    """Writes one run's outputs as the rounds go.

    In a deployment, ``admitted.json`` (written by ``fedsilo-server run`` before the
    run starts: Flower node id -> the name the coordinator admitted with that
    node's key) names the institutions; without it, as in simulations, an
    institution is named by what its replies say.
    """

    ADMITTED = "admitted.json"

    def __init__(self, path: Path, settings: RunSettings, model_spec: dict[str, Any], schema_path: Path) -> None:
        self.path = path
        self.settings = settings
        self.model_spec = model_spec
        self.institutions: dict[str, InstitutionRecord] = {}
        self.rounds: list[dict[str, Any]] = []
        self._serialized: dict[int, list[str]] = {}  # id of a row list -> its rows as JSON (_json_list)
        self.rounds_completed = 0  # the last round whose aggregate was checkpointed
        self.last_round = 0  # the last round that ran to its end (trained or not)
        admitted = path / self.ADMITTED
        self.admitted: dict[str, str] = (
            {str(k): str(v) for k, v in json.loads(admitted.read_text(encoding="utf-8")).items()}
            if admitted.exists()
            else {}
        )
        if settings.resume_from:
            self._reopen()
            return
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(schema_path, path / "schema.toml")
        self._write_metrics()

    def _reopen(self) -> None:
        """Continue a stopped run from its last completed round (``progress.json``)."""
        if (self.path / "report.json").exists():
            raise ConfigError(f"{self.path} holds a finished run; there is nothing to resume")
        try:
            progress = json.loads((self.path / "progress.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{self.path} has no completed round to resume from (no progress.json)") from None
        self.rounds_completed = int(progress["rounds_completed"])
        self.last_round = int(progress["last_round"])
        self.rounds = list(progress["rounds"])
        self.institutions = {n: InstitutionRecord(**r) for n, r in progress["institutions"].items()}
        for stale in (self.path / "checkpoints").glob("round-*.pt"):  # a round that did not complete
            if int(stale.stem.split("-")[1]) > self.rounds_completed:
                stale.unlink()
        self._write_metrics()

    @staticmethod
    def saved_settings(path: Path) -> RunSettings:
        """The settings a stopped run was started with (a resumed run keeps them all)."""
        try:
            progress = json.loads((path / "progress.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path} has no completed round to resume from (no progress.json)") from None
        return replace(RunSettings.from_config(progress["settings"]), resume_from=str(path))

    def last_checkpoint(self) -> list[np.ndarray] | None:
        """The global model after the last completed round (None: no round has completed)."""
        if self.rounds_completed == 0:
            return None
        state = torch.load(self.path / "checkpoints" / f"round-{self.rounds_completed:04d}.pt")
        return [state[k].numpy() for k in self.model_spec["keys"]]

    def _write_metrics(self) -> None:
        with open(self.path / "metrics.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(METRIC_COLUMNS)
            for row in self.rounds:
                writer.writerow([row.get(c, "") for c in METRIC_COLUMNS])

    def institution(self, name: str) -> InstitutionRecord:
        return self.institutions.setdefault(name, InstitutionRecord(name))

    def record_fit(
        self,
        server_round: int,
        name: str,
        num_examples: int,
        metrics: dict[str, Any],
        *,
        skellam: Mapping[str, float] | None = None,
        evaluation: Mapping[str, float] | None = None,
    ) -> None:
        """Book one institution's well-formed fit reply (trained or refused; see ``fedsilo.server.replies``).

        ``skellam``: a distributed-DP round's public accounting (variance and sensitivities),
        which the coordinator knows from the proposal and the model's size. ``evaluation``: the
        round's secure evaluation's (booked when the reply says its evaluation was booked).
        """
        record = self.institution(name)
        record.epsilon = float(metrics.get("epsilon", record.epsilon))
        record.delta = float(metrics.get("delta", record.delta))
        record.neighbouring = str(metrics.get("neighbouring", record.neighbouring))
        if "refused" in metrics:
            record.refusals.append({"round": server_round, "reason": str(metrics["refused"])})
            return
        record.num_examples = num_examples
        record.ledger.append(
            {
                "round": server_round,
                "noise_multiplier": float(metrics["noise-multiplier"]),
                "sample_rate": float(metrics["sample-rate"]),
                "steps": int(metrics["steps"]),
                **({"mechanism": "skellam", **skellam} if skellam is not None else {}),
            }
        )
        if evaluation is not None and metrics.get("secure-evaluation") == "booked":
            record.ledger.append(
                {
                    "round": server_round,
                    "noise_multiplier": 0.0,
                    "sample_rate": 1.0,
                    "steps": 1,
                    "mechanism": "secure-evaluation",
                    **evaluation,
                }
            )

    def record_rejected(self, server_round: int, name: str, stage: str, reason: str) -> None:
        """Book a malformed ``stage`` ("fit" or "evaluate") reply, dropped unused, with why."""
        self.institution(name).rejected.append({"round": server_round, "stage": stage, "reason": reason})

    def save_model(self, weights: list[np.ndarray], name: str) -> Path:
        """Write weights as a torch state dict (keys from the model spec)."""
        state = {k: torch.as_tensor(w) for k, w in zip(self.model_spec["keys"], weights, strict=True)}
        target = self.path / name
        torch.save(state, target)
        return target

    def checkpoint(self, server_round: int, weights: list[np.ndarray]) -> None:
        self.rounds_completed = server_round
        self.save_model(weights, f"checkpoints/round-{server_round:04d}.pt")
        self._save_progress()

    def fit_booked(self, server_round: int) -> None:
        """Every reply of a round's fit is booked: updates have left, so a resume never repeats it."""
        self.last_round = max(self.last_round, server_round)
        self._save_progress()

    def record_round(self, row: dict[str, Any]) -> None:
        """Append a completed round's row."""
        self.rounds.append(row)
        self.last_round = max(self.last_round, int(row["round"]))
        with open(self.path / "metrics.csv", "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([row.get(c, "") for c in METRIC_COLUMNS])
        self._save_progress()

    def _save_progress(self) -> None:
        """What a resume needs, written atomically after every step of a round.

        The rounds' rows and the institutions' ledger, refusal and rejection rows only
        grow, and a row never changes once added: each is serialized once
        (``_json_list``), so a round costs the same at round 1,000 as at round 1.
        """
        head = {
            "settings": self.settings.to_config(),
            "rounds_completed": self.rounds_completed,
            "last_round": self.last_round,
        }
        institutions = ",".join(
            f"{json.dumps(name)}:{self._institution_json(record)}" for name, record in self.institutions.items()
        )
        text = json.dumps(_json_safe(head), allow_nan=False)[:-1]
        text += f',"rounds":{self._json_list(self.rounds)},"institutions":{{{institutions}}}}}'
        scratch = self.path / "progress.json.tmp"
        scratch.write_text(text, encoding="utf-8")
        os.replace(scratch, self.path / "progress.json")

    def _institution_json(self, record: InstitutionRecord) -> str:
        parts = []
        for key in (f.name for f in fields(record)):  # not asdict: it would deep-copy every row again
            value = getattr(record, key)
            text = self._json_list(value) if isinstance(value, list) else json.dumps(_json_safe(value), allow_nan=False)
            parts.append(f"{json.dumps(key)}:{text}")
        return "{" + ",".join(parts) + "}"

    def _json_list(self, rows: list[Any]) -> str:
        """``rows`` as a JSON array, each row serialized once (rows are only ever appended)."""
        done = self._serialized.setdefault(id(rows), [])
        if len(done) > len(rows):  # not the list it was: start again
            done.clear()
        done.extend(json.dumps(_json_safe(row), allow_nan=False) for row in rows[len(done) :])
        return "[" + ",".join(done) + "]"

    def _secure_evaluation(self) -> dict[str, Any] | None:
        """report.json's secure evaluation: its plan and the latest federation-wide DP estimate (None: off)."""
        from fedsilo.common.secure_evaluation import EVAL_EPSILON_FRACTION, evaluation_plan

        plan = evaluation_plan(self.settings.proposal)
        if plan is None:
            return None
        estimates = [r for r in self.rounds if r.get("dp_model_round") is not None]
        latest = estimates[-1] if estimates else {}
        return {
            "what": "federation-wide accuracy and binned ROC AUC estimated from held-out counts summed under "
            "SecAgg+ with Skellam noise (DP estimates; each of the model of dp_model_round)",
            "epsilon_fraction": EVAL_EPSILON_FRACTION,
            "evaluations_planned": plan.evaluations,
            "noise_sd_per_count": math.sqrt(plan.variance),
            "latest": {k.removeprefix("dp_"): v for k, v in latest.items() if k.startswith("dp_")},
        }

    def finish(self, weights: list[np.ndarray], elapsed_s: float) -> dict[str, Any]:
        """Write the final model and report.json; return the report as written (non-finite floats as text)."""
        self.save_model(weights, "model.pt")
        final = self.rounds[-1] if self.rounds else {}
        report = {
            "rounds_planned": self.settings.rounds,
            "rounds_completed": self.rounds_completed,
            "secure_aggregation": self.settings.secagg.enabled,
            "secure_aggregation_settings": self.settings.secagg.workflow_kwargs()
            if self.settings.secagg.enabled
            else None,
            "final_metrics": {k: final[k] for k in SCORE_COLUMNS if k in final},
            "secure_evaluation": self._secure_evaluation(),
            "max_epsilon": max((i.epsilon for i in self.institutions.values()), default=0.0),
            # The relation the noise was calibrated for; each institution's epsilon is for its own (below).
            "neighbouring": self.settings.privacy.neighbouring,
            "institutions": [self.institutions[n].as_report() for n in sorted(self.institutions)],
            "rounds": self.rounds,
            "model": {k: v for k, v in self.model_spec.items() if k != "keys"},
            "settings": self.settings.to_config(),
            "elapsed_s": round(elapsed_s, 3),
            "versions": {
                "python": sys.version.split()[0],
                **{pkg: _version(pkg) for pkg in ("fedsilo", "flwr", "torch", "opacus")},
            },
        }
        written: dict[str, Any] = _json_safe(report)
        text = json.dumps(written, indent=2, allow_nan=False)
        (self.path / "report.json").write_text(text + "\n", encoding="utf-8")
        return written


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"
