"""DP-SGD training: planned before it runs, clipped, noisy, and reproducible."""

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn

from fedsilo.common.models import build_model, get_weights
from fedsilo.common.schema import NumericFeature, Schema
from fedsilo.common.settings import GRAD_SAMPLE_MODES, RunSettings, TrainSettings
from fedsilo.common.training import (
    AUTO_MAX_TRAVEL,
    AUTO_NOISE_IN_WEIGHTS,
    RoundPlan,
    auto_batch_size,
    auto_learning_rate,
    evaluate,
    plan_round,
    step_size,
    train_round,
)

RNG = np.random.default_rng(0)
X = RNG.random((100, 6)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 1).astype(np.int64)
SETTINGS = RunSettings()
SIX_INPUTS = Schema("y", ("0", "1"), tuple(NumericFeature(f"x{i}", 0.0, 1.0) for i in range(6)))


def mlp(hidden_layers: str = "8") -> nn.Module:
    """The run's MLP for six inputs and two classes, from seed 0."""
    return build_model(TrainSettings(model="mlp", hidden_layers=hidden_layers), SIX_INPUTS, seed=0)


def trained(plan: RoundPlan, seed: int, max_grad_norm: float = 1.0) -> list[np.ndarray]:
    model = mlp()
    train_round(model, X, Y, plan=plan, train=SETTINGS.train, max_grad_norm=max_grad_norm, seed=seed)
    return get_weights(model)


def test_plan_uses_opacus_sample_rate_and_calibrates_noise() -> None:
    plan = plan_round(num_examples=100, train=SETTINGS.train, privacy=SETTINGS.privacy, planned_rounds=5)
    assert plan.sample_rate == 1 / 4 and plan.steps == 4 * SETTINGS.train.local_epochs
    assert plan.noise_multiplier > 0.5
    nodp = RunSettings.from_config({"target-epsilon": math.inf}).privacy
    assert plan_round(num_examples=100, train=SETTINGS.train, privacy=nodp, planned_rounds=5).noise_multiplier == 0


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_same_seed_same_weights_other_seed_other_weights(noise: float) -> None:
    plan = RoundPlan(sample_rate=0.25, steps=8, noise_multiplier=noise)
    first, again, other = trained(plan, 1), trained(plan, 1), trained(plan, 2)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert any((a != b).any() for a, b in zip(first, other, strict=True))


def test_every_grad_sample_mode_trains_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # Same clipping, same Poisson batches (empty ones included), same noise: only the speed differs.
    used: list[str] = []
    make_private = PrivacyEngine.make_private

    def spy(self: PrivacyEngine, **kwargs: Any) -> Any:
        used.append(kwargs["grad_sample_mode"])
        return make_private(self, **kwargs)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    plan = RoundPlan(sample_rate=0.02, steps=30, noise_multiplier=1.0)  # about 1 in 7 batches empty
    weights = {}
    for mode in GRAD_SAMPLE_MODES:
        model = mlp()
        train = replace(SETTINGS.train, grad_sample_mode=mode, batch_size=2)
        train_round(model, X, Y, plan=plan, train=train, max_grad_norm=0.5, seed=4)
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert not any(hasattr(p, "_norm_sample") or hasattr(p, "grad_sample") for p in model.parameters())
    for mode in GRAD_SAMPLE_MODES:
        assert torch.allclose(weights[mode], weights["hooks"], atol=1e-5), mode
    assert used == list(GRAD_SAMPLE_MODES)
    assert SETTINGS.train.grad_sample_mode == "ghost"


def test_dp_update_is_bounded_by_clipping_without_noise_amplification() -> None:
    # With almost no noise, one plain SGD step moves the weights by at most lr * C per step.
    plan = RoundPlan(sample_rate=0.25, steps=1, noise_multiplier=1e-9)
    settings = RunSettings.from_config({"momentum": 0.0, "learning-rate": 1.0})
    model = mlp()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_round(model, X, Y, plan=plan, train=settings.train, max_grad_norm=0.01, seed=3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) <= 0.01 + 1e-6


def test_training_learns_and_evaluate_reports_accuracy_and_auc() -> None:
    model = mlp()
    before = evaluate(model, X, Y)
    plan = RoundPlan(sample_rate=0.25, steps=100, noise_multiplier=0.0)
    train_round(model, X, Y, plan=plan, train=SETTINGS.train, max_grad_norm=1.0, seed=0)
    after = evaluate(model, X, Y)
    assert after["accuracy"] > max(before["accuracy"], 0.8)
    assert 0.0 <= after["auc"] <= 1.0 and after["loss"] < before["loss"]


def test_recipe_batch_follows_the_record_count_only() -> None:
    assert auto_batch_size(10) == 10  # a tiny institution: every record every step
    assert auto_batch_size(267) == 32
    assert auto_batch_size(1_600) == 100
    assert auto_batch_size(1_000_000) == 1024
    plan = plan_round(num_examples=1_000_000, train=SETTINGS.train, privacy=SETTINGS.privacy, planned_rounds=8)
    assert plan.batch_size == 1024 and plan.sample_rate == 1 / math.ceil(1_000_000 / 1024)
    assert plan.planned_steps == plan.steps * 8


def test_recipe_defaults_use_no_private_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two real tables with the same record count and schema but different records (German credit's
    # first and last 300 rows, different default rates): the same plan and the same learning rate.
    from fedsilo.common.datasets import load_builtin

    dataset = load_builtin("german-credit")
    inputs, labels = dataset.schema.transform(dataset.frame)
    first, last = slice(0, 300), slice(-300, None)
    assert labels[first].mean() != labels[last].mean() and not np.array_equal(inputs[first], inputs[last])
    lrs: list[float] = []
    real_sgd = torch.optim.SGD

    def spy(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        lrs.append(kwargs["lr"])
        return real_sgd(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", spy)
    plans = []
    for rows in (first, last):
        plan = plan_round(num_examples=300, train=SETTINGS.train, privacy=SETTINGS.privacy, planned_rounds=4)
        model = build_model(SETTINGS.train, dataset.schema, seed=0)
        train_round(model, inputs[rows], labels[rows], plan=plan, train=SETTINGS.train, max_grad_norm=1.0, seed=0)
        plans.append(plan)
    assert plans[0] == plans[1] and plans[0].noise_multiplier > 0
    assert len(lrs) == 2 and lrs[0] == lrs[1] > 0


def test_recipe_learning_rate_spreads_a_travel_budget_over_the_run() -> None:
    kwargs = {"num_parameters": 100, "expected_batch": 32.0, "max_grad_norm": 1.0, "momentum": 0.9}
    # No noise: the whole travel budget, whatever the steps.
    for steps in (10, 1000):
        lr = auto_learning_rate(noise_multiplier=0.0, total_steps=steps, **kwargs)
        assert math.isclose(lr * steps / (1 - 0.9), AUTO_MAX_TRAVEL)
    # More noise travels less; the noise left in the weights stays at the recipe's level.
    quiet = auto_learning_rate(noise_multiplier=1.0, total_steps=400, **kwargs)
    loud = auto_learning_rate(noise_multiplier=8.0, total_steps=400, **kwargs)
    assert loud < quiet
    travel = loud * 400 / (1 - 0.9)
    assert math.isclose(travel * 8.0 * math.sqrt(100) / (32.0 * math.sqrt(400)), AUTO_NOISE_IN_WEIGHTS)


def test_explicit_learning_rate_and_batch_are_used_as_given() -> None:
    train = RunSettings.from_config({"learning-rate": 0.3, "batch-size": 10}).train
    plan = plan_round(num_examples=100, train=train, privacy=SETTINGS.privacy, planned_rounds=2)
    assert plan.batch_size == 10 and plan.sample_rate == 0.1
    model = mlp()
    assert step_size(model, plan, train=train, num_examples=100, max_grad_norm=1.0) == 0.3


def test_weight_bound_keeps_every_parameter_inside_secaggs_clipping_range() -> None:
    # A learning rate far too large drives the weights past 8 unless they are projected back.
    train = RunSettings.from_config({"learning-rate": 50.0, "model": "linear"}).train
    plan = RoundPlan(sample_rate=0.25, steps=20, noise_multiplier=1.0)
    free, bounded = (mlp("") for _ in range(2))
    train_round(free, X, Y, plan=plan, train=train, max_grad_norm=1.0, seed=0)
    train_round(bounded, X, Y, plan=plan, train=train, max_grad_norm=1.0, seed=0, weight_bound=8.0)
    assert max(float(np.abs(w).max()) for w in get_weights(free)) > 8.0
    assert max(float(np.abs(w).max()) for w in get_weights(bounded)) <= 8.0
