"""fedsilo ClientApp: an institution's NumPyClient behind SecAgg+.

Deployed, Flower starts a fresh process for every message, and three of SecAgg+'s
five messages a round need no model: torch and the training code are imported
only when a message trains or evaluates (about 5 s saved per such message).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import NDArrays, Scalar

from client.mods import UNDER_SECURE_AGGREGATION, secure_aggregation_mod
from client.simulated_data import PROCESS_TABLES, SimulatedTables

if TYPE_CHECKING:
    from client.institution import InstitutionData
    from common.settings import RunSettings


class InstitutionClient(NumPyClient):
    """Translates Flower's fit/evaluate calls into ``client.institution``."""

    def __init__(self, context: Context, tables: SimulatedTables) -> None:
        self.context = context
        self.tables = tables

    def _settings_and_data(self, config: dict[str, Scalar]) -> tuple[RunSettings, InstitutionData]:
        import torch

        from client.institution import InstitutionData
        from common.settings import RunSettings

        torch.set_num_threads(1)
        settings = RunSettings.from_config(config)
        return settings, InstitutionData.from_node_config(self.context.node_config, settings, tables=self.tables)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        from client.institution import fit_round

        settings, data = self._settings_and_data(config)
        outcome = fit_round(
            data,
            parameters,
            settings,
            server_round=int(config["server-round"]),
            run_id=str(config.get("run-name", self.context.run_id)),
            secure_aggregation=UNDER_SECURE_AGGREGATION.get(),
        )
        return outcome.weights, outcome.num_examples, dict(outcome.metrics)

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        from client.institution import evaluate_round

        settings, data = self._settings_and_data(config)
        return evaluate_round(data, parameters, settings)


def client_fn(context: Context) -> Client:
    """Build the client for one message (Flower rebuilds it for every message)."""
    return InstitutionClient(context, PROCESS_TABLES).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])
