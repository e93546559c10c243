"""FedAvg's sampling and round configuration, handing every reply to the run's ``Coordinator``.

Flower's ``FedAvg`` (McMahan et al., AISTATS 2017) samples the institutions and
sends them the round's config; what comes back is translated into plain
replies for ``fedsilo.server.coordinator.Coordinator``, which books, aggregates through
the run's ``AggregationQuery`` and writes the run directory. Under SecAgg+ every
FitRes handed to ``aggregate_fit`` already carries the securely aggregated
parameters (``GuardedSecAggPlusWorkflow`` unmasks only sums of at least two
institutions' updates), so the strategy never sees an individual one.
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    log,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager
from flwr.server.strategy import FedAvg

from fedsilo.common.aggregation import Contribution
from fedsilo.common.settings import RunSettings
from fedsilo.runtime.flower.internals import ClientProxy
from fedsilo.server.coordinator import Coordinator, EvaluateReply, FitReply

__all__ = ["WAIT_S", "EvalResults", "FedsiloStrategy", "FitResults", "fit_replies", "institution_name"]

FitResults = list[tuple[ClientProxy, FitRes]]
EvalResults = list[tuple[ClientProxy, EvaluateRes]]

WAIT_S = 86400  # how long a round waits for min-institutions (Flower's own default)


def institution_name(proxy: ClientProxy, res: FitRes | EvaluateRes, admitted: Mapping[str, str]) -> str:
    """Who sent a reply: the name admitted with its node's key when known, else the name the reply asserts.

    Flower's node id (``proxy.cid``) is bound to the key the SuperNode authenticated
    with, so in a deployment (``admitted`` non-empty) one institution cannot book
    under another's name; a differing self-asserted name is only logged.
    """
    asserted = str(res.metrics.get("institution", proxy.cid))
    if not admitted:
        return asserted
    name = admitted.get(proxy.cid, f"unadmitted node {proxy.cid}")
    if asserted != name:
        log(WARNING, "node %s, admitted as %s, calls itself %r; it is named %s", proxy.cid, name, asserted, name)
    return name


def fit_replies(results: FitResults, admitted: Mapping[str, str] | None = None) -> list[FitReply]:
    """Flower's fit results as the coordinator's replies (parameters as sent, num_examples as weight)."""
    return [
        FitReply(
            institution_name(proxy, res, admitted or {}),
            Contribution(parameters_to_ndarrays(res.parameters), res.num_examples),
            res.metrics,
        )
        for proxy, res in results
    ]


class FedsiloStrategy(FedAvg):
    """FedAvg's sampling and configuration; every aggregation and record is the coordinator's."""

    def __init__(
        self,
        settings: RunSettings,
        coordinator: Coordinator,
        round_config: Mapping[str, Scalar],
    ) -> None:
        super().__init__(
            fraction_fit=settings.fraction_fit,
            fraction_evaluate=settings.fraction_evaluate,
            # Every round waits until min-institutions are connected (see configure_fit).
            min_fit_clients=min(2, settings.min_institutions),
            min_evaluate_clients=1,
            min_available_clients=settings.min_institutions,
            initial_parameters=ndarrays_to_parameters(coordinator.current),
            on_fit_config_fn=self.round_config,
            on_evaluate_config_fn=self.round_config,
        )
        self.secure = settings.secagg.enabled
        self.settings = settings
        self.coordinator = coordinator
        self._round_config = dict(round_config)

    def round_config(self, server_round: int) -> dict[str, Scalar]:
        """What every FitIns and EvaluateIns of a round carries: the run's settings and the round."""
        return {**self._round_config, "server-round": server_round}

    def fit_sample_size(self, client_manager: ClientManager) -> int:
        """How many institutions ``configure_fit`` is about to sample, once min-institutions are connected."""
        client_manager.wait_for(self.min_available_clients, timeout=WAIT_S)
        return self.num_fit_clients(client_manager.num_available())[0]

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
        if not self.settings.evaluates(server_round):  # eval-every: the round's row, without scores
            self.coordinator.aggregate_evaluate(server_round, [])
            return []
        client_manager.wait_for(self.min_available_clients, timeout=WAIT_S)
        return super().configure_evaluate(server_round, parameters, client_manager)

    def fit_halted(self, server_round: int, results: FitResults, failures: list[Any]) -> None:
        """A round whose secure sum stays masked: book its replies, keep the model."""
        self.coordinator.book_fit(server_round, fit_replies(results, self.coordinator.run_dir.admitted), failures)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        replies = fit_replies(results, self.coordinator.run_dir.admitted)
        # Under SecAgg+ every reply carries the recovered aggregate, refusals included.
        secure_sum = replies[0].contribution.vector if self.secure and replies else None
        model = self.coordinator.aggregate_fit(server_round, replies, failures, secure_sum=secure_sum)
        if model is None:
            return None, {}
        trained = sum(1 for r in replies if self.coordinator.query.trained(r.contribution, r.metrics))
        return ndarrays_to_parameters(model), {"institutions-trained": trained}

    def aggregate_evaluate(
        self, server_round: int, results: EvalResults, failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        admitted = self.coordinator.run_dir.admitted
        replies = [
            EvaluateReply(institution_name(proxy, res, admitted), res.loss, res.num_examples, res.metrics)
            for proxy, res in results
        ]
        loss, metrics = self.coordinator.aggregate_evaluate(server_round, replies)
        return loss, dict(metrics)
