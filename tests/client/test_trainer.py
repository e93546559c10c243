"""The warm trainer: the same round as in the ClientApp, over a Unix socket, with the institution's own files."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedsilo.client.client_app import InstitutionClient
from fedsilo.client.institution import InstitutionData, fit_round
from fedsilo.client.processes import node_config
from fedsilo.client.simulated_data import SimulatedTables
from fedsilo.client.trainer import SOCKET_KEY, Trainer, TrainerError, TrainerUnavailable, call
from fedsilo.common.datasets import builtin_schema_path, load_builtin
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights
from fedsilo.common.settings import RunSettings

SETTINGS = RunSettings.from_config({"num-server-rounds": 2, "target-epsilon": 2.0, "secure-aggregation": False})
CONFIG = {**SETTINGS.to_config(), "server-round": 1, "run-name": "r"}


def institution_files(root: Path, max_epsilon: float = 10.0) -> dict[str, str]:
    """A bank holding a third of German credit, with its policy and state directory."""
    root.mkdir(parents=True, exist_ok=True)
    load_builtin("german-credit").frame.iloc[:333].to_csv(root / "records.csv", index=False)
    policy = f"max-epsilon = {max_epsilon}\nrequire-secure-aggregation = false\nshare-eval-metrics = true\n"
    (root / "policy.toml").write_text(policy)
    config = node_config(
        name="bank",
        data=root / "records.csv",
        schema=builtin_schema_path("german-credit"),
        policy=root / "policy.toml",
        state_dir=root / "state",
    )
    return {**config, "reproducible-noise": "true"}  # so that two places give the same update


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A trainer serving in a thread on a real Unix socket."""
    config = institution_files(tmp_path / "bank")
    path = tmp_path / "t.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    thread = threading.Thread(target=Trainer(config).serve, args=(listener,), daemon=True)
    thread.start()
    yield {"socket": str(path), "config": config, "root": tmp_path / "bank"}
    listener.close()


def initial() -> list[np.ndarray]:
    schema = load_builtin("german-credit").schema
    return get_weights(build_model(SETTINGS.train, schema, seed=SETTINGS.seed))


def fit_header(server_round: int = 1) -> dict[str, Any]:
    return {"config": CONFIG, "server-round": server_round, "run-id": "r", "secure-aggregation": False}


def test_the_trainer_gives_the_update_the_clientapp_would_and_records_it(
    trainer: dict[str, Any], tmp_path: Path
) -> None:
    answer, weights = call(trainer["socket"], "fit", fit_header(), initial())
    # The same round in this process, with a copy of the institution's files (its split key too).
    files = institution_files(tmp_path / "copy")
    (tmp_path / "copy" / "state").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trainer["root"] / "state" / "holdout.key", tmp_path / "copy" / "state" / "holdout.key")
    here = InstitutionData.from_node_config(files, SETTINGS)
    expected = fit_round(here, initial(), SETTINGS, server_round=1, run_id="r", secure_aggregation=False)
    assert answer["num-examples"] == expected.num_examples > 0
    assert answer["metrics"]["epsilon"] == pytest.approx(expected.metrics["epsilon"])
    assert all(np.array_equal(a, b) for a, b in zip(weights, expected.weights, strict=True))
    entries = PrivacyLedger.for_dataset(trainer["root"] / "state", here.fingerprint).entries
    assert [(e.run_id, e.round) for e in entries] == [("r", 1)]


def test_evaluation_and_errors_come_back(trainer: dict[str, Any]) -> None:
    call(trainer["socket"], "fit", fit_header(1), initial())  # a deployed institution evaluates rounds it trained in
    evaluate = {"config": CONFIG, "server-round": 1, "run-id": "r"}
    answer, _ = call(trainer["socket"], "evaluate", evaluate, initial())
    assert answer["num-examples"] > 0 and 0 <= answer["metrics"]["accuracy"] <= 1
    with pytest.raises(TrainerError, match="num-server-rounds"):
        call(trainer["socket"], "fit", {**fit_header(), "config": {"num-server-rounds": 0}}, initial())
    with pytest.raises(TrainerError, match="unknown operation"):
        call(trainer["socket"], "delete-ledger", {"config": CONFIG}, [])


def test_a_policy_edited_while_the_trainer_runs_is_enforced_at_once(trainer: dict[str, Any]) -> None:
    call(trainer["socket"], "fit", fit_header(1), initial())
    (trainer["root"] / "policy.toml").write_text("max-epsilon = 0.5\nrequire-secure-aggregation = false\n")
    answer, _ = call(trainer["socket"], "fit", fit_header(2), initial())
    assert answer["num-examples"] == 0 and "past its privacy budget" in answer["metrics"]["refused"]


def test_without_its_trainer_the_clientapp_trains_itself(tmp_path: Path) -> None:
    config = institution_files(tmp_path / "bank")
    with pytest.raises(TrainerUnavailable):
        call(str(tmp_path / "nobody.sock"), "fit", fit_header(), initial())
    context = Context(
        run_id=1,
        node_id=1,
        node_config={**config, SOCKET_KEY: str(tmp_path / "nobody.sock")},
        state=RecordDict(),
        run_config={},
    )
    weights, count, metrics = InstitutionClient(context, SimulatedTables()).fit(initial(), CONFIG)
    assert count > 0 and "refused" not in metrics and len(weights) == len(initial())
