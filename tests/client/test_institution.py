"""An institution's round: budget check before training, ledger entry before release."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedsilo.client.institution import (
    MAX_ABS_WEIGHT,
    MAX_WORST_CASE_GRADIENT,
    InstitutionData,
    evaluate_round,
    fit_round,
    split_holdout,
    weight_bound,
    weights_problem,
    worst_case_gradient,
)
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.ledger import PrivacyLedger
from fedsilo.common.models import build_model, get_weights, set_weights
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import plan_round, train_round

SETTINGS = RunSettings.from_config({"num-server-rounds": 3, "target-epsilon": 2.0})


def institution(state: Path, settings: RunSettings = SETTINGS, max_epsilon: float | None = None) -> InstitutionData:
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(state)}
    data = InstitutionData.from_node_config(node, settings)
    return replace(data, policy=PrivacyPolicy(max_epsilon=max_epsilon))


def initial(data: InstitutionData) -> list[np.ndarray]:
    return get_weights(build_model(SETTINGS.train, data.schema, seed=SETTINGS.seed))


def test_each_round_is_recorded_and_epsilon_grows_to_the_target(tmp_path: Path) -> None:
    data = institution(tmp_path)
    weights, epsilons = initial(data), []
    for r in (1, 2, 3):
        out = fit_round(data, weights, SETTINGS, server_round=r, run_id="a")
        assert out.num_examples == len(data.train_y) and "refused" not in out.metrics
        epsilons.append(out.metrics["epsilon"])
        weights = out.weights
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 2.0
    ledger = PrivacyLedger.for_dataset(tmp_path, data.fingerprint)
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    assert ledger.epsilon(delta=SETTINGS.privacy.delta) == epsilons[-1]


def test_clear_text_metrics_carry_nothing_computed_from_records(tmp_path: Path) -> None:
    data = institution(tmp_path)
    out = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    assert set(out.metrics) == {
        "institution",
        "delta",
        "neighbouring",
        "epsilon",
        "steps",
        "noise-multiplier",
        "sample-rate",
    }
    assert out.metrics["neighbouring"] == "add-remove"  # the proposal's: this simulated policy names none


def test_a_restarted_institution_continues_from_its_ledger(tmp_path: Path) -> None:
    first = institution(tmp_path, max_epsilon=10.0)
    one = fit_round(first, initial(first), SETTINGS, server_round=1, run_id="a")
    restarted = institution(tmp_path, max_epsilon=10.0)  # a new process: nothing kept in memory
    assert restarted.fingerprint == first.fingerprint
    two = fit_round(restarted, one.weights, SETTINGS, server_round=2, run_id="a")
    assert two.metrics["epsilon"] > one.metrics["epsilon"]
    entries = PrivacyLedger.for_dataset(tmp_path, first.fingerprint).entries
    assert [(e.run_id, e.round) for e in entries] == [("a", 1), ("a", 2)]


def test_refusal_at_the_budget_trains_nothing_and_spends_nothing(tmp_path: Path) -> None:
    data = institution(tmp_path)
    weights = initial(data)
    for r in (1, 2, 3):
        weights = fit_round(data, weights, SETTINGS, server_round=r, run_id="a").weights
    ledger_file = PrivacyLedger.for_dataset(tmp_path, data.fingerprint).path
    before = ledger_file.read_text()
    out = fit_round(data, weights, SETTINGS, server_round=4, run_id="a")
    assert out.num_examples == 0
    assert "refused round 4" in str(out.metrics["refused"]) and "past its privacy budget" in str(out.metrics["refused"])
    assert all((a == b).all() for a, b in zip(out.weights, weights, strict=True))
    assert ledger_file.read_text() == before
    assert len(json.loads(before)["entries"]) == 3


def test_the_ledger_key_ignores_split_and_order_but_not_the_records(tmp_path: Path) -> None:
    base = institution(tmp_path)
    other_split = institution(tmp_path, RunSettings.from_config({"test-fraction": 0.3}))
    assert other_split.fingerprint == base.fingerprint  # the coordinator cannot reset a budget this way
    other = InstitutionData.from_node_config({"partition-id": 1, "num-partitions": 3, "state-dir": "x"}, SETTINGS)
    assert other.fingerprint != base.fingerprint


def test_deployed_institutions_draw_noise_the_run_config_cannot_predict(tmp_path: Path) -> None:
    data = institution(tmp_path, max_epsilon=100.0)
    deployed = replace(data, reproducible=False)
    one = fit_round(deployed, initial(data), SETTINGS, server_round=1, run_id="a")
    two = fit_round(deployed, initial(data), SETTINGS, server_round=1, run_id="a")
    assert any((a != b).any() for a, b in zip(one.weights, two.weights, strict=True))
    sim_one = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    sim_two = fit_round(data, initial(data), SETTINGS, server_round=1, run_id="a")
    assert all((a == b).all() for a, b in zip(sim_one.weights, sim_two.weights, strict=True))


@pytest.mark.parametrize("secure", [True, False])
def test_more_records_than_secagg_max_weight_train_at_the_largest_weight(tmp_path: Path, secure: bool) -> None:
    # Prepare: about 150 training records against a maximum weight of 10
    data = institution(tmp_path)
    settings = RunSettings.from_config({"secagg-max-weight": 10.0, "secure-aggregation": secure})

    # Execute
    out = fit_round(data, initial(data), settings, server_round=1, run_id="a")

    # Assert: no refusal; it trained, recorded the round and weighs the maximum, with SecAgg+ or without
    assert len(data.train_y) > 100 and "refused" not in out.metrics
    assert out.num_examples == 10
    assert any((a != b).any() for a, b in zip(out.weights, initial(data), strict=True))
    assert [e.round for e in PrivacyLedger.for_dataset(tmp_path, data.fingerprint).entries] == [1]


def test_an_update_stays_inside_the_runs_weight_bound_with_or_without_secagg(tmp_path: Path) -> None:
    # A learning rate far too large would push weights past secagg-clipping-range, where SecAgg+
    # would clip them silently; the institution keeps them inside it (projected SGD), and without
    # SecAgg+ too: one bound keeps every received model within what the overflow check covers.
    loud = SETTINGS.with_overrides({"learning-rate": 200.0, "secagg-clipping-range": 2.0})
    data = institution(tmp_path)
    masked = fit_round(data, initial(data), loud, server_round=1, run_id="a", secure_aggregation=True)
    plain = fit_round(data, initial(data), loud, server_round=1, run_id="b", secure_aggregation=False)
    for out in (masked, plain):
        assert max(float(np.abs(w).max()) for w in out.weights) == pytest.approx(2.0)  # reached, not passed


def crafted_overflow_model(data: InstitutionData, target: int) -> list[np.ndarray]:
    """A linear model whose first logit overflows float32 for record ``target`` only.

    Every input weight of class 0 is ``F``: the logit is ``F * sum(x)``, finite for every
    record whose inputs sum below the threshold and infinite (then NaN in the loss) above it.
    """
    sums = data.train_x.astype(np.float64).sum(axis=1)
    top, second = np.sort(sums)[-1], np.sort(sums)[-2]
    assert sums[target] == top and top > second > 1.0
    scale = float(np.finfo(np.float32).max) / ((top + second) / 2)
    weight = np.zeros((2, data.train_x.shape[1]), dtype=np.float32)
    weight[0] = scale
    return [weight, np.zeros(2, dtype=np.float32)]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_a_crafted_model_cannot_turn_a_chosen_records_update_non_finite(tmp_path: Path, mode: str) -> None:
    # Prepare: the target is the record with the largest inputs; every record is sampled each step
    settings = SETTINGS.with_overrides({"batch-size": 100000, "grad-sample-mode": mode})
    data = institution(tmp_path)
    target = int(np.argmax(data.train_x.astype(np.float64).sum(axis=1)))
    without = replace(data, train_x=np.delete(data.train_x, target, axis=0), train_y=np.delete(data.train_y, target))
    crafted = crafted_overflow_model(data, target)
    plan = plan_round(num_examples=len(data.train_y), train=settings.train, privacy=settings.privacy, planned_rounds=3)

    # The attack works against the trainer itself: the update is non-finite only with the target
    def update_is_finite(d: InstitutionData) -> bool:
        model = build_model(settings.train, d.schema, seed=0)
        set_weights(model, crafted)
        train_round(model, d.train_x, d.train_y, plan=plan, train=settings.train, max_grad_norm=1.0, seed=1)
        return all(np.isfinite(w).all() for w in get_weights(model))

    assert not update_is_finite(data) and update_is_finite(without)

    # Execute: the crafted model reaches the institution's round, with and without the target
    present = fit_round(data, crafted, settings, server_round=1, run_id="a", secure_aggregation=False)
    absent = fit_round(without, crafted, settings, server_round=1, run_id="a", secure_aggregation=False)

    # Assert: refused before training either way, the same reason, nothing spent, nothing non-finite out
    for out in (present, absent):
        assert out.num_examples == 0 and "received global model is unsafe" in str(out.metrics["refused"])
        assert all(np.isfinite(w).all() and not w.any() for w in out.weights)
    assert present.metrics == absent.metrics
    assert not (tmp_path / "ledgers").exists() or not list((tmp_path / "ledgers").glob("*.json"))


@pytest.mark.parametrize("value", [np.nan, np.inf, 2e3])
def test_non_finite_or_huge_weights_are_refused_in_fit_and_evaluate(tmp_path: Path, value: float) -> None:
    data = replace(institution(tmp_path), policy=PrivacyPolicy(share_eval_metrics=True))
    weights = initial(data)
    weights[0] = weights[0].copy()
    weights[0].flat[0] = value
    out = fit_round(data, weights, SETTINGS, server_round=1, run_id="a")
    loss, count, metrics = evaluate_round(data, weights, SETTINGS)
    assert out.num_examples == 0 and "unsafe" in str(out.metrics["refused"])
    assert all(np.isfinite(w).all() for w in out.weights)
    assert count == 0 and loss == 0.0 and "refused to evaluate" in str(metrics["refused"])
    assert not (tmp_path / "ledgers").exists() or not list((tmp_path / "ledgers").glob("*.json"))


def test_a_model_too_deep_to_bound_is_refused_and_the_shipped_models_are_not() -> None:
    schema = institution(Path("unused")).schema
    for config in ({}, {"model": "mlp"}, {"model": "mlp", "hidden-layers": "64,64"}):
        assert worst_case_gradient(RunSettings.from_config(config), schema) <= MAX_WORST_CASE_GRADIENT
    deep = RunSettings.from_config({"model": "mlp", "hidden-layers": "256,256,256"})
    assert worst_case_gradient(deep, schema) > MAX_WORST_CASE_GRADIENT
    assert "use a smaller model" in str(weights_problem([], deep, schema, bound=MAX_ABS_WEIGHT))
    assert weights_problem([], deep, schema, bound=deep.secagg.clipping_range) is None


def sides(inputs: np.ndarray, labels: np.ndarray, settings: RunSettings, key: bytes) -> dict[bytes, bool]:
    """Each record (as bytes) and whether it is held out."""
    train_x, test_x, train_y, test_y = split_holdout(inputs, labels, settings, key=key)
    out = {np.append(x, y).tobytes(): False for x, y in zip(train_x, train_y, strict=True)}
    return {**out, **{np.append(x, y).tobytes(): True for x, y in zip(test_x, test_y, strict=True)}}


@pytest.mark.parametrize(
    ("overrides", "secure"),
    [({}, True), ({}, False), ({"dp-mode": "distributed"}, True)],
    ids=["local-secagg", "local-plain", "distributed"],
)
def test_the_shipped_cnn_is_accepted_in_every_mode(overrides: dict[str, str], secure: bool) -> None:
    # Fashion-MNIST's CNN: with weights up to 1000 its worst-case gradient (1.9e43) would overflow
    # float32, so a bound that large refused every distributed round of the shipped image model
    settings = RunSettings.from_config({"dataset": "fashion-mnist-train", "model": "cnn", **overrides})
    schema = Schema.load(builtin_schema_path("fashion-mnist"))
    bound = weight_bound(settings, secure_aggregation=secure)
    assert bound == settings.secagg.clipping_range
    assert weights_problem([], settings, schema, bound=bound) is None
    assert "use a smaller model" in str(weights_problem([], settings, schema, bound=MAX_ABS_WEIGHT))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adding_one_record_moves_no_other_record_between_train_and_held_out(seed: int) -> None:
    # Prepare: 500 distinct records, and the same table with one more record inserted in the middle
    rng = np.random.default_rng(seed)
    inputs, labels = rng.random((500, 6)).astype(np.float32), rng.integers(0, 2, 500)
    extra = rng.random((1, 6)).astype(np.float32)
    grown_x, grown_y = np.insert(inputs, 250, extra, axis=0), np.insert(labels, 250, 1)
    settings = RunSettings.from_config({"seed": seed})
    key = rng.bytes(32)

    # Execute
    before, after = sides(inputs, labels, settings, key), sides(grown_x, grown_y, settings, key)

    # Assert: every record stays on its side; only the new one is new; about test-fraction is held out
    assert len(before) == 500 and len(after) == 501
    assert {k: after[k] for k in before} == before
    assert 0.12 < np.mean(list(before.values())) < 0.28


def test_the_split_key_is_the_institutions_secret_when_deployed_and_the_seed_in_simulations(tmp_path: Path) -> None:
    from fedsilo.common.datasets import DATA_DIR

    node = {
        "data-path": str(DATA_DIR / "german_credit.csv"),
        "schema-path": str(DATA_DIR / "german_credit.schema.toml"),
        "state-dir": str(tmp_path / "bank"),
        "max-epsilon": 3.0,
    }
    first = InstitutionData.from_node_config(node, SETTINGS)
    key_file = tmp_path / "bank" / "holdout.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = InstitutionData.from_node_config(node, SETTINGS.with_overrides({"seed": 7}))  # the coordinator's seed
    assert np.array_equal(first.test_x, again.test_x)  # moves nothing
    other = InstitutionData.from_node_config({**node, "state-dir": str(tmp_path / "other")}, SETTINGS)
    assert not np.array_equal(first.test_x, other.test_x)  # another institution's secret, another split
    # Simulations: the seed decides, so every engine and every baseline splits alike
    simulated = institution(tmp_path / "sim")
    assert np.array_equal(simulated.test_x, institution(tmp_path / "sim2").test_x)
    reseeded = institution(tmp_path / "sim3", RunSettings.from_config({"num-server-rounds": 3, "seed": 7}))
    assert not np.array_equal(simulated.test_x, reseeded.test_x)
