"""Tripwires: each fails when a Flower upgrade moves or changes what ``runtime/flower`` patches, copies or imports.

A failure here means: read the named Flower module of the new version, adapt the
fedsilo module named in the message (or drop its patch if Flower now does the
job), then update the expectation below. Nothing else in fedsilo touches Flower's
private code.
"""

import ast
import dataclasses
import hashlib
import inspect
import subprocess
import time
from pathlib import Path

import flwr.superlink.grid.http_grid as http_grid
import flwr.supernode.start_client_internal as supernode_internal
import pytest

from fedsilo.runtime.flower import internals
from fedsilo.runtime.flower.polling import CappedSleep
from fedsilo.runtime.flower.workflow import FLOWER_CALL_SHA256

ROOT = Path(__file__).resolve().parents[2]
# Flower's public modules; anything deeper is private and comes through fedsilo.runtime.flower.internals.
PUBLIC = {
    "flwr.app",
    "flwr.client",
    "flwr.client.mod",
    "flwr.clientapp",
    "flwr.common",
    "flwr.server",
    "flwr.server.strategy",
    "flwr.server.workflow",
    "flwr.serverapp",
    "flwr.simulation",
}


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def source(module: object) -> str:
    return Path(str(module.__file__)).read_text()  # type: ignore[attr-defined]


# runtime/flower/polling.py and runtime/flower/supernode.py: the capped sleeps


def test_flowers_supernode_still_sleeps_through_the_time_module() -> None:
    assert supernode_internal.time is time  # what cap_polling replaces; a Flower upgrade that changes it fails here
    text = source(supernode_internal)
    assert "time.sleep(3)" in text  # the idle poll of the coordinator: capped at FEDSILO_SUPERNODE_POLL_S
    push = text.split("def _push_messages", 1)[1]
    assert push.count("time.sleep(0.5)") == 2  # the waits on its own state: capped at LOCAL_POLL_S


def test_the_serverapps_grid_still_sleeps_through_the_time_module() -> None:
    # cap_grid_polling replaces http_grid.time (tests of the cap may already have done so in this process).
    assert http_grid.time is time or isinstance(http_grid.time, CappedSleep)
    text = source(http_grid)
    assert "import time\n" in text
    assert "def send_and_receive" in text and "time.sleep(3)" in text  # what the cap shortens


# runtime/flower/supernode.py: the FAB pin (Flower's FAB-verification hook)


def test_flowers_fab_verification_hook_is_still_where_the_pin_expects_it() -> None:
    text = source(supernode_internal)
    assert 'fab.verifications.get("valid_license", "")' in text  # the flag the pin sets
    assert "_verify_fab(fab, trusted_entities)" in text and "trusted_entities=trusted_entities" in text
    # pin_client_app wraps _pull_and_store_message (keywords get_fab, trusted_entities) and replaces _verify_fab.
    assert {"get_fab", "trusted_entities"} <= set(parameters(supernode_internal._pull_and_store_message))
    assert parameters(supernode_internal._verify_fab) == ["fab", "trusted_entities"]
    from flwr.supercore.fab import Fab

    assert {"content", "verifications"} <= {field.name for field in dataclasses.fields(Fab)}


def test_flower_still_installs_a_fab_under_a_path_made_of_the_fields_fab_problem_checks() -> None:
    # runtime/flower/supernode.py's PATH_FIELDS: what Flower joins into FLWR_HOME/apps/<...>.
    import flwr.cli.install as install
    from flwr.common.config import get_metadata_from_config

    from fedsilo.runtime.flower.supernode import PATH_FIELDS

    config = {"tool": {"flwr": {"app": {"publisher": "P"}}}, "project": {"name": "N", "version": "V"}}
    assert get_metadata_from_config(config) == ("P/N", "V")
    assert {keys[-1] for keys in PATH_FIELDS} == {"publisher", "name", "version"}
    text = source(install)
    assert "fab_id, version = get_metadata_from_config(config)" in text
    assert 'f"{publisher}.{project_name}.{version}.{fab_hash[:FAB_HASH_TRUNCATION]}"' in text


# runtime/flower/supernode.py: the warm-ClientApps launcher


def test_the_supernode_still_starts_flower_superexec_through_the_subprocess_module() -> None:
    assert supernode_internal.subprocess is subprocess
    assert '["flower-superexec"]' in source(supernode_internal)


# runtime/flower/superexec.py: the forking SuperExec


def test_flowers_superexec_still_picks_its_executor_where_fedsilo_replaces_it() -> None:
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.superexec.executor.types import ExecutionSpec

    assert callable(superexec.get_executor) and "executor = get_executor(" in source(superexec)
    assert {"task_type", "runtime_api_address", "token", "parent_pid"} <= set(ExecutionSpec.__dataclass_fields__)


def test_what_the_forking_executor_calls_still_has_its_shape() -> None:
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResult
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    used = {"task_type", "runtime_dependency_install", "runtime_api_address", "token", "insecure"}
    used |= {"root_certificates_path", "parent_pid", "task_id"}
    assert used <= set(ExecutionSpec.__dataclass_fields__)
    assert parameters(SubprocessExecutor.launch) == ["self", "spec"]
    assert callable(LaunchResult.accepted) and TaskType.CLIENT_APP
    assert parameters(run_clientapp) == [
        "runtime_api_address",
        "token",
        "insecure",
        "certificates",
        "parent_pid",
        "runtime_dependency_install",
    ]
    assert parameters(validate_and_resolve_root_certificates) == ["root_cert_path", "insecure"]
    assert callable(flower_superexec)


# runtime/flower/workflow.py: the copy of DefaultWorkflow.__call__


def test_the_copied_default_workflow_still_matches_flowers() -> None:
    from flwr.server.workflow import DefaultWorkflow

    found = hashlib.sha256(inspect.getsource(DefaultWorkflow.__call__).encode()).hexdigest()
    assert found == FLOWER_CALL_SHA256, (
        "Flower's DefaultWorkflow.__call__ changed: review ResumableWorkflow.__call__ (runtime/flower/workflow.py) "
        "against the new flwr/server/workflow/default_workflows.py, then set FLOWER_CALL_SHA256 to " + found
    )


def test_what_the_copied_workflow_calls_still_has_its_shape() -> None:
    from flwr.server.compat.app_utils import start_update_client_manager_thread
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.default_workflows import (
        default_centralized_evaluation_workflow,
        default_init_params_workflow,
    )

    assert parameters(start_update_client_manager_thread) == ["grid", "client_manager"]
    assert parameters(default_init_params_workflow) == ["grid", "context"]
    assert parameters(default_centralized_evaluation_workflow) == ["_", "context"]  # Flower ignores the grid
    assert parameters(DefaultWorkflow.__init__) == ["self", "fit_workflow", "evaluate_workflow"]
    assert internals.WorkflowKey.START_TIME and internals.WorkflowKey.CURRENT_ROUND


# runtime/flower/internals.py: Flower's private names the rest of fedsilo uses


def test_only_runtime_flower_imports_flowers_private_modules() -> None:
    found = []
    for package in ("common", "client", "server", "simulations", "runtime"):
        for path in sorted((ROOT / package).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where.startswith("runtime/flower/"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=where)):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                found += [f"{where}:{node.lineno} {m}" for m in modules if m.startswith("flwr.") and m not in PUBLIC]
    assert not found, "import from Flower's public modules or fedsilo.runtime.flower.internals: " + ", ".join(found)


@pytest.mark.parametrize("name", internals.__all__)
def test_every_reexported_internal_exists(name: str) -> None:
    assert getattr(internals, name) is not None


def test_the_secure_aggregation_internals_keep_their_shape() -> None:
    assert parameters(internals.quantize) == ["parameters", "clipping_range", "target_range"]
    assert parameters(internals.dequantize) == ["quantized_parameters", "clipping_range", "target_range"]
    assert parameters(internals.factor_combine) == ["factor", "parameters"]
    assert parameters(internals.factor_extract) == ["parameters"]
    assert parameters(internals.parameters_addition) == ["parameters1", "parameters2"]
    assert parameters(internals.parameters_mod) == ["parameters", "divisor"]
    assert parameters(internals.parameters_multiply) == ["parameters", "multiplier"]
    assert internals.SecAggKey.NODE_ID_LIST and internals.SecAggKey.SHARE_LIST and internals.RECORD_KEY_CONFIGS
    fields = {field.name for field in dataclasses.fields(internals.WorkflowState)}
    assert set(internals.WORKFLOW_STATE_FIELDS) <= fields


def test_the_secaggplus_stages_fedsilo_overrides_keep_their_shape() -> None:
    from flwr.server.workflow import SecAggPlusWorkflow

    for stage, expected in internals.SECAGGPLUS_STAGES.items():
        assert parameters(getattr(SecAggPlusWorkflow, stage)) == list(expected), stage


def test_flowers_in_process_simulation_entry_still_takes_what_the_runner_passes() -> None:
    from flwr.simulation.run_simulation import _run_simulation

    assert set(internals.RUN_SIMULATION_PARAMETERS) <= set(parameters(_run_simulation))
