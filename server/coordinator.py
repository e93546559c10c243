"""The coordinator's side of a round, whichever engine delivers the replies: book, aggregate, checkpoint, report.

Both engines call one ``Coordinator``: Flower's through ``FedsiloStrategy`` (and
``GuardedSecAggPlusWorkflow``'s halt callback), the in-process engine directly.
It books every fit reply (trained or refused) in the run directory, aggregates
through the run's ``fedsilo.common.aggregation.AggregationQuery``, checkpoints the new
model, carries each round's trained and refused counts to its metrics row, and
writes the report once at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import log

from fedsilo.common import secure_evaluation as seval
from fedsilo.common.aggregation import AggregationQuery, Contribution, DistributedSkellamSum, Weights
from fedsilo.common.errors import ConfigError
from fedsilo.common.metrics import LABELS, MODEL_METRICS
from fedsilo.server.replies import evaluate_problems, fit_problems, vector_problems
from fedsilo.server.run_directory import RunDirectory

RoundCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class FitReply:
    """One institution's answer to a fit request: its contribution and clear-text metrics."""

    institution: str
    contribution: Contribution
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateReply:
    """One institution's scores of the global model on its held-out records (weight 0: withheld)."""

    institution: str
    loss: float
    num_examples: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


class Coordinator:
    """Books, aggregates and reports a run's rounds; the one place both engines hand their replies to.

    Parameters
    ----------
    run_dir
        The run directory (metrics.csv, checkpoints, progress.json, report.json).
    query
        The run's aggregation.
    weights
        The global model before the first round to run.
    on_round
        Receives each round's metrics row (for CLIs and tests).
    """

    def __init__(
        self,
        run_dir: RunDirectory,
        query: AggregationQuery[Any],
        weights: Weights,
        *,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.query = query
        self.current = weights
        self.on_round = on_round
        self.started = time.monotonic()
        self.distributed = isinstance(query, DistributedSkellamSum)
        self._counts: dict[int, tuple[int, int]] = {}  # round -> (trained, refused or failed)
        self._estimates: dict[int, dict[str, Any]] = {}  # round -> the secure evaluation's estimate

    def book_fit(
        self, server_round: int, replies: Sequence[FitReply], failures: Sequence[object], *, updates: bool = False
    ) -> list[FitReply]:
        """Record every fit reply (trained, refused or malformed) and failure; return the well-formed ones in order.

        A malformed reply (``fedsilo.server.replies.fit_problems``) is booked as
        rejected, with its reason, and nothing of it is used: not its privacy
        metrics, not its update. With ``updates`` (the replies' own updates are
        to be aggregated: no SecAgg+), an update that is not a finite model
        shaped as the global one makes a reply malformed too. A round
        halted before its secure sum was unmasked is booked here and nothing
        else: its updates have left, so a resume never repeats it.
        """
        ordered = sorted(replies, key=lambda r: r.institution)  # a fixed order: the same seed, the same sum
        valid = []
        for reply in ordered:
            problems = fit_problems(reply.contribution.weight, reply.metrics, distributed=self.distributed)
            if updates and not problems and reply.contribution.weight > 0:
                problems = vector_problems(reply.contribution.vector, self.current)
            if problems:
                self._reject(server_round, reply.institution, "fit", problems)
                continue
            valid.append(reply)
            self.run_dir.record_fit(
                server_round,
                reply.institution,
                int(reply.metrics.get("records", 0)) if self.distributed else reply.contribution.weight,
                dict(reply.metrics),
                skellam=self._skellam(),
                evaluation=self._evaluation(server_round),
            )
            if "refused" in reply.metrics:
                log(WARNING, "%s", reply.metrics["refused"])
        for failure in failures:
            log(WARNING, "round %s: an institution failed: %s", server_round, failure)
        trained = sum(1 for r in valid if self.query.trained(r.contribution, r.metrics))
        self._counts[server_round] = (trained, len(ordered) - trained + len(failures))
        self.run_dir.fit_booked(server_round)
        return valid

    def _skellam(self) -> dict[str, float] | None:
        """A distributed round's public accounting (None: local DP-SGD), as every institution plans it."""
        if not isinstance(self.query, DistributedSkellamSum):
            return None
        plan = self.query.plan(sum(int(w.size) for w in self.current))
        return {
            "variance": plan.total_variance,
            "l2_sensitivity": plan.l2_sensitivity,
            "l1_sensitivity": plan.l1_sensitivity,
        }

    def _evaluation(self, server_round: int) -> dict[str, float] | None:
        """The round's secure evaluation's public accounting (None: the round carries none)."""
        settings = self.run_dir.settings
        plan = seval.evaluation_plan(settings.proposal)
        if plan is None or seval.evaluated_round(settings, server_round) is None:
            return None
        return {"variance": plan.variance, "l2_sensitivity": 1.0, "l1_sensitivity": 1.0}

    def _secure_estimate(self, server_round: int, secure_sum: Weights, replies: Sequence[FitReply]) -> Weights:
        """The model's part of the secure sum; the counts' part becomes the round's federation-wide estimate.

        The counts are the last array (``fedsilo.common.secure_evaluation``): the exact noisy sum
        is recovered with the summed weight ratio of the replies (their weights are in the clear),
        and only the estimate derived from it is kept (post-processing).
        """
        settings = self.run_dir.settings
        model_round = seval.evaluated_round(settings, server_round)
        if model_round is None:
            return secure_sum
        secagg = settings.secagg
        ratios = [
            seval.weight_ratio(
                r.contribution.weight, max_weight=secagg.max_weight, quantization_range=secagg.quantization_range
            )
            for r in replies
        ]
        contributing = [r for r, q in zip(replies, ratios, strict=True) if q > 0]
        try:
            summed = seval.integer_sum(
                np.asarray(secure_sum[-1]),
                total_ratio=sum(ratios),
                contributors=len(contributing),
                clipping_range=secagg.clipping_range,
                quantization_range=secagg.quantization_range,
            )
        except ConfigError as err:
            log(WARNING, "round %s: the secure evaluation's sum is unusable: %s", server_round, err)
            return list(secure_sum[:-1])
        variance = sum(float(r.metrics.get("evaluation-variance", 0.0)) for r in contributing)
        found = seval.estimate(summed, num_classes=seval.classes_of(summed.size), variance=variance)
        self._estimates[server_round] = {"model_round": model_round, **found}
        return list(secure_sum[:-1])

    def _reject(self, server_round: int, institution: str, stage: str, problems: Sequence[str]) -> None:
        reason = "; ".join(problems)
        log(WARNING, "round %s: dropped %s's malformed %s reply: %s", server_round, institution, stage, reason)
        self.run_dir.record_rejected(server_round, institution, stage, reason)

    def aggregate_fit(
        self,
        server_round: int,
        replies: Sequence[FitReply],
        failures: Sequence[object],
        *,
        secure_sum: Weights | None = None,
    ) -> Weights | None:
        """Book the replies, aggregate them into the new global model and checkpoint it; None: unchanged.

        ``secure_sum`` is what SecAgg+ recovered (the replies then carry no
        individual update); without it the contributions are accumulated here.

        A malformed reply is dropped. Without SecAgg+ the others are
        aggregated. Under SecAgg+ its masked update is already inside the sum
        and cannot be taken out, so the round's aggregate is not used at all:
        the model stays unchanged, as in a round whose sum stays masked.
        """
        ordered = self.book_fit(server_round, replies, failures, updates=secure_sum is None)
        if secure_sum is not None and len(ordered) == len(replies):
            secure_sum = self._secure_estimate(server_round, secure_sum, ordered)
        if secure_sum is not None and len(ordered) < len(replies):
            log(
                WARNING,
                "round %s: a malformed reply's update is inside the secure sum; the round's aggregate is not used "
                "and the model is unchanged",
                server_round,
            )
            return None
        trained = [r for r in ordered if self.query.trained(r.contribution, r.metrics)]
        if not trained:
            log(WARNING, "round %s: no institution trained; the model is unchanged", server_round)
            return None
        model: Weights | None
        if secure_sum is not None:
            model = self.query.finish_secure(
                secure_sum,
                [r.contribution.weight for r in ordered],
                server_round=server_round,
                current=self.current,
                records=sum(int(r.metrics.get("records", 0)) for r in trained),
            )
        else:
            state = self.query.initial_state()
            for reply in ordered:
                state = self.query.accumulate(state, reply.contribution)
            model = self.query.finish(state)
        if model is None:
            return None
        self.current = model
        self.run_dir.checkpoint(server_round, model)
        return model

    def aggregate_evaluate(
        self, server_round: int, replies: Sequence[EvaluateReply]
    ) -> tuple[float | None, dict[str, float]]:
        """Write the round's metrics row from the evaluations; return the weighted loss and scores.

        Each score is the mean over the institutions that report it, weighted by
        their held-out records (AUC, average precision and balanced accuracy need
        both classes among an institution's records); institutions whose policy
        withholds evaluation metrics reply with zero weight and are left out, and
        a malformed reply (``fedsilo.server.replies.evaluate_problems``) is
        dropped with its reason booked.
        """
        valid = []
        for reply in sorted(replies, key=lambda r: r.institution):
            if problems := evaluate_problems(reply.loss, reply.num_examples, reply.metrics):
                self._reject(server_round, reply.institution, "evaluate", problems)
            else:
                valid.append(reply)
        shared = [r for r in valid if r.num_examples > 0 and "accuracy" in r.metrics]
        total = sum(r.num_examples for r in shared)
        loss = sum(r.loss * r.num_examples for r in shared) / total if total else None
        metrics: dict[str, float] = {}
        for key in (k for k in MODEL_METRICS if k != "loss"):
            reporting = [r for r in shared if key in r.metrics]
            weight = sum(r.num_examples for r in reporting)
            if weight:
                metrics[key] = sum(float(r.metrics[key]) * r.num_examples for r in reporting) / weight
        trained, refused = self._counts.get(server_round, (0, 0))
        epsilons = [rec.epsilon for rec in self.run_dir.institutions.values()]
        estimate = self._estimates.get(server_round, {})
        row: dict[str, Any] = {
            "round": server_round,
            **{key: metrics.get(key) for key in MODEL_METRICS if key != "loss"},
            "loss": loss,
            "max_epsilon": max(epsilons, default=0.0),
            "institutions_trained": trained,
            "institutions_refused": refused,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            **({f"dp_{key}": estimate.get(key) for key in ESTIMATE_KEYS} if estimate else {}),
        }
        self.run_dir.record_round(row)
        scores = ", ".join(f"{LABELS[k]} {_fmt(row[k])}" for k in MODEL_METRICS if row[k] is not None)
        log(
            INFO,
            "[fedsilo] round %s/%s: %s%s, max epsilon %.3f, %s trained, %s refused",
            server_round,
            self.run_dir.settings.rounds,
            scores or "no evaluation metrics",
            _estimate_text(estimate),
            row["max_epsilon"],
            trained,
            refused,
        )
        if self.on_round is not None:
            self.on_round(row)
        return loss, metrics

    def finish(self, elapsed_s: float) -> dict[str, Any]:
        """Write the final model and report.json; return the report."""
        return self.run_dir.finish(self.current, elapsed_s)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# A round's secure-evaluation estimate, as metrics.csv / progress.json columns (each prefixed "dp_").
ESTIMATE_KEYS = ("model_round", "accuracy", "accuracy_sd", "auc", "noise_sd")


def _estimate_text(estimate: Mapping[str, Any]) -> str:
    """The printed round line's federation-wide DP estimate ('' when the round carries none)."""
    if not estimate:
        return ""
    auc = "" if estimate.get("auc") is None else f", AUC {estimate['auc']:.4f}"
    accuracy = estimate.get("accuracy")
    spread = "" if accuracy is None else f" +- {estimate['accuracy_sd']:.4f}"
    return (
        f"; federation-wide DP estimate (model of round {estimate['model_round']}, noise sd "
        f"{estimate['noise_sd']:.3g} per count): accuracy {_fmt(accuracy)}{spread}{auc}"
    )
