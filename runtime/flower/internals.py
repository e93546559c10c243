"""The one place fedsilo's code imports Flower's private modules from (outside the patches beside it).

Flower's public modules are ``flwr.app``, ``flwr.common``, ``flwr.server`` (with
``strategy`` and ``workflow``), ``flwr.client`` (with ``mod``), ``flwr.clientapp``,
``flwr.serverapp`` and ``flwr.simulation``; the names below live only deeper. Import
them from here, never from ``flwr.*`` directly, so that a Flower upgrade is reviewed
in one place: ``tests/runtime/test_flower_tripwires.py`` checks each one's shape.
A name that Flower also exports publicly (``flwr.common.log``, ``flwr.server.LegacyContext``,
``flwr.app.MessageType``, ``flwr.server.ClientManager``) is imported from its public home instead.
"""

from __future__ import annotations

from typing import Any

# The type of a ClientApp's next handler, as a mod receives it.
from flwr.clientapp.typing import ClientAppCallable

# SecAgg+'s protocol: the record and key names, and the arithmetic of its masked sums
# (the in-process engine and fedsilo.server.aggregation reproduce the workflow's numbers).
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

# The legacy server API: a client's proxy (strategies' signatures), the workflow's
# main config record and its keys (current round), SecAgg+'s workflow state.
from flwr.server.client_proxy import ClientProxy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

# The grid of Flower's simulation engine (the ServerApp tells a simulation from a deployment by it).
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

# The SecAgg+ workflow stages that fedsilo's workflow overrides (name: Flower's parameters).
SECAGGPLUS_STAGES = {
    "setup_stage": ("self", "grid", "context", "state"),
    "collect_masked_vectors_stage": ("self", "grid", "context", "state"),
    "unmask_stage": ("self", "grid", "context", "state"),
}

# The parts of SecAgg+'s workflow state that fedsilo's workflow reads.
WORKFLOW_STATE_FIELDS = ("legacy_results", "failures", "threshold")

# What the simulation runner passes to Flower's private in-process simulation entry.
RUN_SIMULATION_PARAMETERS = (
    "num_supernodes",
    "client_app",
    "server_app",
    "backend_config",
    "server_app_context",
    "exit_event",
    "verbose_logging",
)


def run_simulation_in_process(**kwargs: Any) -> None:
    """Flower's ``_run_simulation`` (``flwr run``'s local simulation, ServerApp in this process).

    Imported when called: it brings in Flower's simulation engine (Ray), which nothing else here needs.
    """
    from flwr.simulation.run_simulation import _run_simulation

    _run_simulation(**kwargs)


__all__ = [
    "MAIN_CONFIGS_RECORD",
    "RECORD_KEY_CONFIGS",
    "RUN_SIMULATION_PARAMETERS",
    "SECAGGPLUS_STAGES",
    "WORKFLOW_STATE_FIELDS",
    "ClientAppCallable",
    "ClientProxy",
    "InMemoryGrid",
    "SecAggKey",
    "WorkflowKey",
    "WorkflowState",
    "dequantize",
    "factor_combine",
    "factor_extract",
    "parameters_addition",
    "parameters_mod",
    "parameters_multiply",
    "quantize",
    "run_simulation_in_process",
]
