"""fedsilo ClientApp: an institution's NumPyClient behind SecAgg+."""

from __future__ import annotations

import torch
from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from client.institution import InstitutionData, evaluate_round, fit_round
from client.mods import secure_aggregation_mod
from common.settings import RunSettings


class InstitutionClient(NumPyClient):
    """Translates Flower's fit/evaluate calls into ``client.institution``."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def _settings_and_data(self, config: dict[str, Scalar]) -> tuple[RunSettings, InstitutionData]:
        settings = RunSettings.from_config(config)
        return settings, InstitutionData.from_node_config(self.context.node_config, settings)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        settings, data = self._settings_and_data(config)
        outcome = fit_round(
            data,
            parameters,
            settings,
            server_round=int(config["server-round"]),
            run_id=str(config.get("run-name", self.context.run_id)),
        )
        return outcome.weights, outcome.num_examples, dict(outcome.metrics)

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        settings, data = self._settings_and_data(config)
        return evaluate_round(data, parameters, settings)


def client_fn(context: Context) -> Client:
    """Build the client for one message (Flower rebuilds it for every message)."""
    torch.set_num_threads(1)
    return InstitutionClient(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
