"""Distributed DP's settings, policy key, reply checks and sweep axis: each validated where people write them."""

from __future__ import annotations

import re

import pytest

from fedsilo.client.mods import GUARD_STATE, secure_round
from fedsilo.client.policy import PrivacyPolicy
from fedsilo.common import distributed_dp as ddp
from fedsilo.common.accounting import calibrate_noise, calibrate_skellam_noise
from fedsilo.common.aggregation import DistributedPlan, plan_distributed
from fedsilo.common.errors import ConfigError
from fedsilo.common.settings import DISTRIBUTED_SAMPLE_RATES, RunSettings
from fedsilo.server.replies import fit_problems
from fedsilo.simulations.sweep_spec import parse_sweep

TRAINED = {"delta": 1e-5, "epsilon": 1.0, "noise-multiplier": 2.0, "sample-rate": 0.1, "steps": 1, "records": 40}


def test_the_mode_is_one_of_two_and_named_when_wrong() -> None:
    assert RunSettings().privacy.mode == "local" and not RunSettings().distributed
    assert RunSettings.from_config({"dp-mode": "distributed"}).distributed
    expected = "'dp-mode' must be one of 'local', 'distributed'. Found 'central'"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        RunSettings.from_config({"dp-mode": "central"})


def test_the_sample_rate_is_the_setting_else_epochs_over_rounds() -> None:
    assert RunSettings.from_config({"num-server-rounds": 100, "local-epochs": 2}).sample_rate == 0.02
    assert RunSettings.from_config({"num-server-rounds": 1, "local-epochs": 2}).sample_rate == 1.0
    assert RunSettings.from_config({"sample-rate": 0.3}).sample_rate == 0.3
    with pytest.raises(ConfigError, match="'sample-rate' must be in"):
        RunSettings.from_config({"sample-rate": 1.5})


def _noise_per_record(*, sample_rate: float, epsilon: float, rounds: int, dim: int = 62) -> float:
    """The Skellam accountant's noise for this rate, over the expected batch (in units of C / records)."""
    dim_padded = ddp.padded_dimension(dim)
    sigma = calibrate_skellam_noise(
        target_epsilon=epsilon,
        delta=1e-5,
        sample_rate=sample_rate,
        steps=rounds,
        scale=ddp.scale_for(dim_padded=dim_padded, max_grad_norm=1.0),
        max_grad_norm=1.0,
        dim_padded=dim_padded,
    )
    return sigma / sample_rate


@pytest.mark.parametrize(("epsilon", "rounds"), [(2.0, 256), (8.0, 64)])
def test_the_distributed_default_rate_carries_the_least_noise_per_record(epsilon: float, rounds: int) -> None:
    # Prepare: a distributed proposal that leaves sample-rate at 0
    settings = RunSettings.from_config(
        {"dp-mode": "distributed", "num-server-rounds": rounds, "local-epochs": 2, "target-epsilon": epsilon}
    )
    epochs_over_rounds = settings.train.local_epochs / rounds  # the old default
    # Execute
    rate = settings.sample_rate
    # Assert: a candidate, not the old rule, and no rate a person might pick (the old rule's, pooled's 1/16,
    # the small ones) gives a step less noise per record, at a real model's size
    assert rate in DISTRIBUTED_SAMPLE_RATES and rate != epochs_over_rounds
    ours = _noise_per_record(sample_rate=rate, epsilon=epsilon, rounds=rounds)
    for other in (epochs_over_rounds, 1 / 16, 1 / 32, 1 / 64, 1 / 256):
        assert ours <= _noise_per_record(sample_rate=other, epsilon=epsilon, rounds=rounds)
    # and the Skellam accounting's price over the Gaussian (PLD) is small there
    gaussian = calibrate_noise(target_epsilon=epsilon, delta=1e-5, sample_rate=rate, steps=rounds)
    assert ours * rate / gaussian < 1.2


def test_the_distributed_default_is_public_facts_only_and_local_mode_keeps_its_rule() -> None:
    distributed = {"dp-mode": "distributed", "num-server-rounds": 64}
    rates = {RunSettings.from_config({**distributed, "dataset": d}).sample_rate for d in ("german-credit", "digits")}
    assert len(rates) == 1  # the table never enters it
    assert RunSettings.from_config({**distributed, "sample-rate": 0.3}).sample_rate == 0.3
    assert RunSettings.from_config({**distributed, "noise-multiplier": 3.0}).sample_rate == 1.0
    assert RunSettings.from_config({**distributed, "target-epsilon": "inf"}).sample_rate == 1.0
    assert RunSettings.from_config({"num-server-rounds": 64, "local-epochs": 2}).sample_rate == 2 / 64


def test_the_distributed_default_keeps_a_whole_noise_share_inside_secaggs_range() -> None:
    # Prepare: 256 rounds at epsilon 2, a linear model (64 rotated coordinates) and a large one (32,768)
    settings = RunSettings.from_config({"dp-mode": "distributed", "num-server-rounds": 256})
    small, large = plan_distributed(settings, 62), plan_distributed(settings, 30_000)

    # Execute: the chance that an institution adding the whole noise itself (min-honest 1) leaves the range
    def out_of_range(plan: DistributedPlan, noise: float) -> float:
        variance = (plan.scale * noise * plan.max_grad_norm) ** 2
        return ddp.out_of_range_probability(variance=variance, bits=plan.bits, dim_padded=plan.dim_padded)

    # Assert: the small model takes q = 1; the large one, whose noise at q = 1 would not fit, a smaller rate that does
    assert small.sample_rate == 1.0 and out_of_range(small, small.noise_multiplier) <= ddp.MAX_OUT_OF_RANGE
    assert out_of_range(large, small.noise_multiplier) > ddp.MAX_OUT_OF_RANGE
    assert large.sample_rate < 1.0 and out_of_range(large, large.noise_multiplier) <= ddp.MAX_OUT_OF_RANGE


@pytest.mark.parametrize("extra", [{}, {"secure-evaluation": True}], ids=["training", "with-secure-evaluation"])
def test_the_default_rate_fits_the_noise_the_runs_own_relation_calibrates(extra: dict[str, object]) -> None:
    # A model of 4,000 parameters: at q = 1 the add/remove noise fits SecAgg+'s range, the replace-one
    # noise (about twice as large) does not; the rule must rank with the relation the run calibrates for
    def plan(relation: str) -> DistributedPlan:
        config = {"dp-mode": "distributed", "num-server-rounds": 256, "neighbouring": relation, **extra}
        return plan_distributed(RunSettings.from_config(config), 4_000)

    def out_of_range(p: DistributedPlan, noise: float) -> float:
        variance = (p.scale * noise * p.max_grad_norm) ** 2
        return ddp.out_of_range_probability(variance=variance, bits=p.bits, dim_padded=p.dim_padded)

    add_remove, replace_one = plan("add-remove"), plan("replace-one")
    assert add_remove.sample_rate == 1.0
    assert out_of_range(add_remove, add_remove.noise_multiplier) <= ddp.MAX_OUT_OF_RANGE
    whole_batch_replace_one = calibrate_skellam_noise(
        target_epsilon=2.0,
        delta=1e-5,
        sample_rate=1.0,
        steps=256,
        scale=replace_one.scale,
        max_grad_norm=replace_one.max_grad_norm,
        dim_padded=replace_one.dim_padded,
        neighbouring="replace-one",
    )
    assert out_of_range(replace_one, whole_batch_replace_one) > ddp.MAX_OUT_OF_RANGE  # q = 1 would be refused
    assert replace_one.sample_rate < 1.0
    assert out_of_range(replace_one, replace_one.noise_multiplier) <= ddp.MAX_OUT_OF_RANGE


def test_eval_every_evaluates_every_k_rounds_and_the_last() -> None:
    settings = RunSettings.from_config({"num-server-rounds": 7, "eval-every": 3})
    assert [r for r in range(1, 8) if settings.evaluates(r)] == [3, 6, 7]
    with pytest.raises(ConfigError, match="'eval-every' must be an integer >= 1"):
        RunSettings.from_config({"eval-every": 0})


def test_min_honest_is_a_policy_key_of_at_least_one() -> None:
    assert PrivacyPolicy.from_mapping({"min-honest": 4}, "policy.toml").min_honest == 4
    assert PrivacyPolicy().min_honest == 1
    with pytest.raises(ConfigError, match=re.escape("policy.toml: 'min-honest' must be an integer >= 1")):
        PrivacyPolicy.from_mapping({"min-honest": 0}, "policy.toml")


def test_a_distributed_refusal_weighs_like_a_share_and_a_trained_reply_names_its_records() -> None:
    refusal = {"delta": 1e-5, "epsilon": 0.5, "refused": "spent"}
    assert fit_problems(1000, refusal, distributed=True) == []
    assert fit_problems(1000, refusal) != []  # a local refusal must weigh nothing
    assert fit_problems(1000, TRAINED, distributed=True) == []
    problems = fit_problems(1000, {**TRAINED, "records": 0}, distributed=True)
    assert problems == ["'records' must be an integer >= 1; found 0"]


def test_the_fit_reads_the_secagg_setup_the_guard_checked() -> None:
    from flwr.app import ConfigRecord, Context, RecordDict

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert secure_round(context) is None
    context.state.config_records[GUARD_STATE] = ConfigRecord({"stage": "setup", "sample": 5, "threshold": 4})
    assert secure_round(context) == (5, 4)
    context.state.config_records[GUARD_STATE] = ConfigRecord({"stage": "refused"})
    assert secure_round(context) is None


def test_sweeps_take_the_mode_as_an_axis_and_skip_plain_distributed_setups() -> None:
    spec = parse_sweep(
        {"dp-modes": ["local", "distributed"], "secure-aggregation": [True, False], "epsilons": [1]}, "sweep.toml"
    )
    modes = sorted((s.secure_aggregation, s.dp_mode) for s in spec.setups)
    assert modes == [(False, "local"), (True, "distributed"), (True, "local")]
    task = next(t for t in spec.tasks() if t.setup.dp_mode == "distributed")
    assert spec.run_settings(task).distributed and "distributed" in task.run_id
    with pytest.raises(ConfigError, match="'dp-modes' must hold 'local' or 'distributed'"):
        parse_sweep({"dp-modes": ["central"]}, "sweep.toml")
    with pytest.raises(ConfigError, match="every setup is plain"):
        parse_sweep({"dp-modes": ["distributed"], "secure-aggregation": [False]}, "sweep.toml")


def test_a_setup_whose_ranges_differ_from_the_proposal_is_refused_for_distributed_dp() -> None:
    from fedsilo.client.mods import distributed_setup_problems
    from fedsilo.runtime.flower.internals import SecAggKey as Key

    proposal = RunSettings.from_config({"dp-mode": "distributed"}).proposal
    honest = {
        "sample": 3,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 4194304,
        Key.MOD_RANGE: 4294967296,
        Key.MAX_WEIGHT: 1000.0,
    }
    assert distributed_setup_problems(honest, proposal) == []
    # A smaller clipping range would clip every institution's value to about one bit: its sign.
    clipped = distributed_setup_problems({**honest, Key.CLIPPING_RANGE: 0.001}, proposal)
    assert len(clipped) == 1 and "clipping_range" in clipped[0]
    # A smaller maximum weight scales each value up past the range; a small modulus wraps the sum.
    assert "max_weight" in distributed_setup_problems({**honest, Key.MAX_WEIGHT: 10.0}, proposal)[0]
    assert "wrap" in distributed_setup_problems({**honest, Key.MOD_RANGE: 8388608}, proposal)[0]
    assert len(distributed_setup_problems({"sample": 3}, proposal)) == 4  # a setup that says nothing
