"""fedsilo ClientApp: an institution's NumPyClient behind SecAgg+.

Deployed, Flower starts a fresh process for every message. Three of SecAgg+'s
five messages a round need no model, so torch and the training code are imported
only when a message trains or evaluates; and when ``fedsilo-client start`` runs
the institution's warm trainer (``fedsilo.client.trainer``, named by the node config's
``trainer-socket``), fit and evaluate are handed to it and this process never
imports torch at all (about 5 s saved per message on 2 cores). Without a trainer
(simulation, or one that is not answering) the same code runs here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from fedsilo.client.mods import UNDER_SECURE_AGGREGATION, secure_aggregation_mod, secure_round
from fedsilo.client.simulated_data import PROCESS_TABLES, SimulatedTables
from fedsilo.client.trainer import SOCKET_KEY, call
from fedsilo.common.errors import TrainerUnavailable
from fedsilo.common.settings import Proposal, RunSettings

if TYPE_CHECKING:
    from fedsilo.client.institution import InstitutionData


def institution_settings(node_config: Mapping[str, Any], config: Mapping[str, Any]) -> RunSettings:
    """A message's settings, parsed once: the coordinator's proposal, and nothing else for a deployed node.

    A simulated node (no ``data-path``: the researcher plays every institution) also
    takes the researcher's paths for it from the message (``RunSettings.institution_config``);
    a deployed institution's paths are its node config's, never the coordinator's.
    """
    if "data-path" in node_config:
        return RunSettings.of(Proposal.from_config(config))
    return RunSettings.from_config(config)


class InstitutionClient(NumPyClient):
    """Translates Flower's fit/evaluate calls into ``fedsilo.client.institution``."""

    def __init__(self, context: Context, tables: SimulatedTables) -> None:
        self.context = context
        self.tables = tables

    def _settings_and_data(self, config: dict[str, Scalar]) -> tuple[RunSettings, InstitutionData]:
        import torch

        from fedsilo.client.institution import InstitutionData

        torch.set_num_threads(1)
        settings = institution_settings(self.context.node_config, config)
        return settings, InstitutionData.from_node_config(self.context.node_config, settings, tables=self.tables)

    def _warm_trainer(
        self, op: str, header: dict[str, object], parameters: NDArrays
    ) -> tuple[dict[str, Any], NDArrays] | None:
        """The warm trainer's answer, or None when there is no trainer to ask."""
        socket_path = self.context.node_config.get(SOCKET_KEY)
        if not socket_path:
            return None
        try:
            return call(str(socket_path), op, header, parameters)
        except TrainerUnavailable as err:
            logging.getLogger(__name__).warning("%s; running %s in the ClientApp instead", err, op)
            return None

    def _run_id(self, config: dict[str, Scalar]) -> str:
        """The run a round belongs to, as the ledger records it."""
        return str(config.get("run-name", self.context.run_id))

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config["server-round"])
        run_id = self._run_id(config)
        secure = UNDER_SECURE_AGGREGATION.get()
        setup = secure_round(self.context) if secure else None
        header = {
            "config": dict(config),
            "server-round": server_round,
            "run-id": run_id,
            "secure-aggregation": secure,
            "secure-round": list(setup) if setup else None,
        }
        if (warm := self._warm_trainer("fit", header, parameters)) is not None:
            answer, weights = warm
            return weights, int(answer["num-examples"]), dict(answer["metrics"])
        from fedsilo.client.institution import fit_round

        settings, data = self._settings_and_data(config)
        outcome = fit_round(
            data,
            parameters,
            settings,
            server_round=server_round,
            run_id=run_id,
            secure_aggregation=secure,
            secure_round=setup,
        )
        return outcome.weights, outcome.num_examples, dict(outcome.metrics)

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        # The round and run name the evaluation, so that the institution answers each once.
        server_round, run_id = int(config["server-round"]), self._run_id(config)
        header = {"config": dict(config), "server-round": server_round, "run-id": run_id}
        if (warm := self._warm_trainer("evaluate", header, parameters)) is not None:
            answer, _ = warm
            return float(answer["loss"]), int(answer["num-examples"]), dict(answer["metrics"])
        from fedsilo.client.institution import evaluate_round

        settings, data = self._settings_and_data(config)
        return evaluate_round(data, parameters, settings, server_round=server_round, run_id=run_id)


def client_fn(context: Context) -> Client:
    """Build the client for one message (Flower rebuilds it for every message)."""
    return InstitutionClient(context, PROCESS_TABLES).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
