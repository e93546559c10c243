"""FedAvg with fedsilo's bookkeeping: refusals, checkpoints, round metrics.

Aggregation itself is Flower's weighted FedAvg (McMahan et al., AISTATS 2017).
Under SecAgg+ every FitRes handed to ``aggregate_fit`` already carries the
securely aggregated parameters, so averaging them returns that aggregate; with
``GuardedSecAggPlusWorkflow`` that aggregate always sums at least two
institutions' updates, so the strategy never sees an individual one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import INFO, WARNING
from typing import Any

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from common.metrics import LABELS, MODEL_METRICS
from common.settings import RunSettings
from server.run_directory import RunDirectory

RoundCallback = Callable[[dict[str, Any]], None]
FitResults = list[tuple[ClientProxy, FitRes]]
EvalResults = list[tuple[ClientProxy, EvaluateRes]]


def _name(result: tuple[ClientProxy, FitRes | EvaluateRes]) -> str:
    return str(result[1].metrics.get("institution", result[0].cid))


WAIT_S = 86400  # how long a round waits for min-institutions (Flower's own default)


class FedsiloStrategy(FedAvg):
    """Weighted FedAvg that books privacy metrics and writes the run directory."""

    def __init__(
        self,
        settings: RunSettings,
        run_dir: RunDirectory,
        initial_parameters: Parameters,
        round_config: Mapping[str, Scalar],
        on_round: RoundCallback | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=settings.fraction_fit,
            fraction_evaluate=settings.fraction_evaluate,
            # Every round waits until min-institutions are connected (see configure_fit).
            min_fit_clients=min(2, settings.min_institutions),
            min_evaluate_clients=1,
            min_available_clients=settings.min_institutions,
            initial_parameters=initial_parameters,
            on_fit_config_fn=self._config,
            on_evaluate_config_fn=self._config,
            fit_metrics_aggregation_fn=lambda fits: {"institutions-trained": len(fits)},
        )
        self.settings = settings
        self.run_dir = run_dir
        self.round_config = round_config
        self.on_round = on_round
        self.current = parameters_to_ndarrays(initial_parameters)
        self.started = time.monotonic()
        self._trained: dict[int, tuple[int, int]] = {}

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        # FedAvg sizes its sample from the institutions connected *before* it waits for
        # min-institutions; wait first, so a round never starts with whoever came first.
        client_manager.wait_for(self.min_available_clients, timeout=WAIT_S)
        return super().configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        client_manager.wait_for(self.min_available_clients, timeout=WAIT_S)
        return super().configure_evaluate(server_round, parameters, client_manager)

    def _config(self, server_round: int) -> dict[str, Scalar]:
        return {**self.round_config, "server-round": server_round}

    def book_fit(self, server_round: int, results: FitResults, failures: list[Any]) -> FitResults:
        """Record every fit reply (trained or refused); return those that trained, in a fixed order."""
        results = sorted(results, key=_name)  # a fixed order: the same seed, the same sum
        for _, res in results:
            self.run_dir.record_fit(server_round, res.num_examples, res.metrics)
            if "refused" in res.metrics:
                log(WARNING, "%s", res.metrics["refused"])
        for failure in failures:
            log(WARNING, "round %s: an institution failed: %s", server_round, failure)
        trained = [r for r in results if r[1].num_examples > 0]
        self._trained[server_round] = (len(trained), len(results) - len(trained) + len(failures))
        self.run_dir.fit_booked(server_round)
        return trained

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        trained = self.book_fit(server_round, results, failures)
        if not trained:
            log(WARNING, "round %s: no institution trained; the model is unchanged", server_round)
            return None, {}
        parameters, metrics = super().aggregate_fit(server_round, trained, failures)
        if parameters is not None:
            self.current = parameters_to_ndarrays(parameters)
            self.run_dir.checkpoint(server_round, self.current)
        return parameters, metrics

    def aggregate_evaluate(
        self, server_round: int, results: EvalResults, failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        # Institutions whose policy withholds evaluation metrics reply with zero weight.
        results = sorted((r for r in results if r[1].num_examples > 0 and "accuracy" in r[1].metrics), key=_name)
        total = sum(res.num_examples for _, res in results)
        metrics: dict[str, Scalar] = {}
        loss = None
        if total:
            loss = sum(res.loss * res.num_examples for _, res in results) / total
        # Each score: the mean over the institutions that report it, weighted by their held-out records
        # (AUC, average precision and balanced accuracy need both classes among an institution's records).
        for key in (k for k in MODEL_METRICS if k != "loss"):
            reporting = [res for _, res in results if key in res.metrics]
            weight = sum(res.num_examples for res in reporting)
            if weight:
                metrics[key] = sum(float(res.metrics[key]) * res.num_examples for res in reporting) / weight
        trained, refused = self._trained.get(server_round, (0, 0))
        epsilons = [rec.epsilon for rec in self.run_dir.institutions.values()]
        row: dict[str, Any] = {
            "round": server_round,
            **{key: metrics.get(key) for key in MODEL_METRICS if key != "loss"},
            "loss": loss,
            "max_epsilon": max(epsilons, default=0.0),
            "institutions_trained": trained,
            "institutions_refused": refused,
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }
        self.run_dir.record_round(row)
        scores = ", ".join(f"{LABELS[k]} {_fmt(row[k])}" for k in MODEL_METRICS if row[k] is not None)
        log(
            INFO,
            "[fedsilo] round %s/%s: %s, max epsilon %.3f, %s trained, %s refused",
            server_round,
            self.settings.rounds,
            scores or "no evaluation metrics",
            row["max_epsilon"],
            trained,
            refused,
        )
        if self.on_round is not None:
            self.on_round(row)
        return loss, metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
