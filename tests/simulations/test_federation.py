"""Real federations in Flower's simulation engine (Ray), with and without SecAgg+.

The simulations (``runs``, in conftest.py) are shared by the tests of this
package: SecAgg+ twice with one seed, plain FedAvg with the same seed, spent
budgets and per-institution policies. A spy strategy records what the
aggregation hands to the strategy.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsilo.common.accounting import DPSGDEvent, epsilon_spent
from fedsilo.common.datasets import load_builtin
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.settings import RunSettings
from fedsilo.server.server_app import build_server_app
from fedsilo.simulations.runner import run_federation
from tests.simulations.conftest import INSTITUTIONS, ROUNDS, SpyStrategy

pytestmark = pytest.mark.simulation


def model(path: Path) -> list[torch.Tensor]:
    return list(torch.load(path / "model.pt").values())


def test_secagg_federation_learns_well_above_the_majority_rate(runs: dict[str, Any]) -> None:
    path, report, _ = runs["secagg"]
    labels = load_builtin("breast-cancer").frame["diagnosis"]
    majority = labels.value_counts(normalize=True).max()
    assert report["secure_aggregation"] is True
    assert report["rounds_completed"] == ROUNDS
    assert report["final_metrics"]["accuracy"] >= majority + 0.15
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    assert [int(r["round"]) for r in rows] == list(range(1, ROUNDS + 1))
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == [f"round-{r:04d}.pt" for r in (1, 2, 3)]
    assert (path / "schema.toml").exists()


def test_report_contract_and_epsilon_equal_to_the_persisted_ledger(runs: dict[str, Any]) -> None:
    path, report, _ = runs["secagg"]
    assert json.loads((path / "report.json").read_text()) == report
    assert [i["name"] for i in report["institutions"]] == ["hospital-1", "hospital-2", "hospital-3"]
    for inst in report["institutions"]:
        assert inst["num_examples"] > 0 and inst["delta"] == 1e-5
        assert [e["round"] for e in inst["ledger"]] == [1, 2, 3]
        (ledger_file,) = (path / "state" / inst["name"] / "ledgers").glob("*.json")
        persisted = PrivacyLedger.for_dataset(ledger_file.parent.parent, ledger_file.stem)
        assert inst["epsilon"] == pytest.approx(persisted.epsilon(delta=1e-5), rel=1e-12)
        assert inst["epsilon"] <= 2.0


def test_epsilon_strictly_increases_round_over_round(runs: dict[str, Any]) -> None:
    path, report, _ = runs["secagg"]
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    per_round = [float(r["max_epsilon"]) for r in rows]
    assert all(a < b for a, b in itertools.pairwise(per_round))
    prefixes = []
    for inst in report["institutions"]:
        events = [DPSGDEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in inst["ledger"]]
        prefixes.append([epsilon_spent(events[: k + 1], delta=1e-5) for k in range(len(events))])
    assert per_round == pytest.approx(np.max(prefixes, axis=0).tolist(), rel=1e-9)


def test_same_seed_gives_the_same_model(runs: dict[str, Any]) -> None:
    first, again = model(runs["secagg"][0]), model(runs["secagg-again"][0])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert runs["secagg"][1]["final_metrics"] == runs["secagg-again"][1]["final_metrics"]


def test_secagg_and_plain_fedavg_agree_up_to_quantization_error(runs: dict[str, Any]) -> None:
    (secure_dir, secure_report, _), (plain_dir, plain_report, _) = runs["secagg"], runs["plain"]
    assert plain_report["secure_aggregation"] is False
    for path in (secure_dir, plain_dir):  # every round waited for all three institutions
        rows = list(csv.DictReader((path / "metrics.csv").open()))
        assert [r["institutions_trained"] for r in rows] == [str(INSTITUTIONS)] * ROUNDS
    # Round 1 starts from the same model with the same local training, so the two
    # aggregates differ only by SecAgg+'s quantization: at most one level
    # (2 * clipping range / quantization range) per institution, on the weighted sum.
    total_weight = sum(i["num_examples"] for i in secure_report["institutions"]) / 1000.0
    bound = INSTITUTIONS * (2 * 8.0 / 2**22) / total_weight
    first_secure = list(torch.load(secure_dir / "checkpoints" / "round-0001.pt").values())
    first_plain = list(torch.load(plain_dir / "checkpoints" / "round-0001.pt").values())
    gaps = [float((a - b).abs().max()) for a, b in zip(first_secure, first_plain, strict=True)]
    assert 0 < max(gaps) <= bound * 1.01
    # Later rounds train on slightly different models; they stay close.
    final_gaps = [float((a - b).abs().max()) for a, b in zip(model(secure_dir), model(plain_dir), strict=True)]
    assert max(final_gaps) < 0.01


def test_the_strategy_never_receives_an_individual_institutions_parameters(runs: dict[str, Any]) -> None:
    _, _, secure_seen = runs["secagg"]
    _, _, plain_seen = runs["plain"]
    assert len(secure_seen) == ROUNDS and all(len(r) == INSTITUTIONS for r in secure_seen)
    for received in secure_seen:  # under SecAgg+ every result carries the one aggregate
        for other in received[1:]:
            assert all(np.array_equal(a, b) for a, b in zip(received[0], other, strict=True))
    for received in plain_seen:  # the control: plain FedAvg hands over distinct updates
        assert not all(np.array_equal(a, b) for a, b in zip(received[0], received[1], strict=True))


def test_a_lone_contributor_is_never_unmasked_and_its_spent_privacy_is_reported(runs: dict[str, Any]) -> None:
    path, report, seen = runs["exhausted"]
    spent = {i["name"]: i["epsilon"] for i in runs["secagg"][1]["institutions"]}
    by_name = {i["name"]: i for i in report["institutions"]}
    for name in ("hospital-1", "hospital-2"):  # at their budget: refused, nothing spent
        # What they spent in the earlier run counts against their budget, but is not reported to this one.
        assert spent[name] > 0 and by_name[name]["ledger"] == [] and by_name[name]["epsilon"] == 0.0
        assert [r["round"] for r in by_name[name]["refusals"]] == [1, 2]
        assert "past its privacy budget" in by_name[name]["refusals"][0]["reason"]
    # hospital-3 trained alone: SecAgg+ halts before unmasking, so the strategy never
    # receives its update, yet the rounds it trained count against its budget.
    assert seen == []
    assert [e["round"] for e in by_name["hospital-3"]["ledger"]] == [1, 2]
    assert by_name["hospital-3"]["epsilon"] > 0
    assert report["rounds_completed"] == 0
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    assert [(r["institutions_trained"], r["institutions_refused"]) for r in rows] == [("1", "2"), ("1", "2")]
    assert list((path / "checkpoints").iterdir()) == []


def test_institutions_leave_by_their_own_policy_while_the_federation_goes_on(runs: dict[str, Any]) -> None:
    path, report, seen = runs["policies"]
    by_name = {i["name"]: i for i in report["institutions"]}
    # hospital-1 trained one round (epsilon 1.18 of its 1.4), then its budget ended its part.
    assert [e["round"] for e in by_name["hospital-1"]["ledger"]] == [1]
    assert [r["round"] for r in by_name["hospital-1"]["refusals"]] == [2, 3]
    assert "past its privacy budget" in by_name["hospital-1"]["refusals"][0]["reason"]
    assert by_name["hospital-1"]["epsilon"] <= 1.4
    # hospital-2 refused every round: the coordinator asks for 2 local epochs, its policy allows 1.
    assert by_name["hospital-2"]["ledger"] == [] and by_name["hospital-2"]["epsilon"] == 0
    assert [r["round"] for r in by_name["hospital-2"]["refusals"]] == [1, 2, 3]
    assert "local-epochs 2 is above the policy's max-local-epochs 1" in by_name["hospital-2"]["refusals"][0]["reason"]
    # The others trained every round, and every round completed.
    for name in ("hospital-3", "hospital-4"):
        assert [e["round"] for e in by_name[name]["ledger"]] == [1, 2, 3] and by_name[name]["refusals"] == []
    assert report["rounds_completed"] == ROUNDS and len(seen) == ROUNDS
    rows = list(csv.DictReader((path / "metrics.csv").open()))
    assert [(r["institutions_trained"], r["institutions_refused"]) for r in rows] == [
        ("3", "1"),
        ("2", "2"),
        ("2", "2"),
    ]
    assert all(0 < float(r["accuracy"]) <= 1 for r in rows)  # hospital-4 withholds its metrics; the others report


def drops_out_at_the_setup(msg: Any, ctx: Any, call_next: Any) -> Any:
    """hospital-2 (partition 1) fails every SecAgg+ setup, as a refusing or crashed institution does."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if int(ctx.node_config["partition-id"]) == 1 and configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
        raise RuntimeError("hospital-2 drops out at the SecAgg+ setup")
    return call_next(msg, ctx)


def test_an_institution_that_drops_out_at_the_secagg_setup_leaves_the_round_to_the_others(tmp_path: Path) -> None:
    # Prepare: four hospitals, hospital-2 failing every SecAgg+ setup. Flower 1.41 asked, at unmasking,
    # for the secrets of the node that never shared keys: no one held them, so the round halted
    # ("Not enough shares to recover secret"), and each institution would refuse to reveal them.
    from flwr.clientapp import ClientApp

    from fedsilo.client.client_app import client_fn
    from fedsilo.client.mods import secure_aggregation_mod

    client_app = ClientApp(client_fn=client_fn, mods=[drops_out_at_the_setup, secure_aggregation_mod])
    settings = RunSettings().with_overrides({"num-server-rounds": 2, "seed": 7, "out-dir": str(tmp_path)})
    SpyStrategy.seen = []
    # Execute
    report = run_federation(
        settings, institutions=4, server_app=build_server_app(strategy_cls=SpyStrategy), client_app=client_app
    )
    # Assert: both rounds were unmasked from the three others (hospital-2 never replied, so it is not in the report)
    assert [len(replies) for replies in SpyStrategy.seen] == [3, 3]
    assert report["rounds_completed"] == 2 and [r["institutions_trained"] for r in report["rounds"]] == [3, 3]
    by_name = {i["name"]: i for i in report["institutions"]}
    assert sorted(by_name) == ["hospital-1", "hospital-3", "hospital-4"]
    assert all([e["round"] for e in by_name[name]["ledger"]] == [1, 2] for name in by_name)
