"""DP-SGD training: planned before it runs, clipped, noisy, and reproducible."""

import math

import numpy as np
import pytest
import torch

from common.models import build_mlp, get_weights
from common.settings import RunSettings
from common.training import RoundPlan, evaluate, plan_round, train_round

RNG = np.random.default_rng(0)
X = RNG.random((100, 6)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 1).astype(np.int64)
SETTINGS = RunSettings()


def trained(plan: RoundPlan, seed: int, max_grad_norm: float = 1.0) -> list[np.ndarray]:
    model = build_mlp(6, 2, (8,), seed=0)
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


def test_dp_update_is_bounded_by_clipping_without_noise_amplification() -> None:
    # With almost no noise, one plain SGD step moves the weights by at most lr * C per step.
    plan = RoundPlan(sample_rate=0.25, steps=1, noise_multiplier=1e-9)
    settings = RunSettings.from_config({"momentum": 0.0, "learning-rate": 1.0})
    model = build_mlp(6, 2, (8,), seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_round(model, X, Y, plan=plan, train=settings.train, max_grad_norm=0.01, seed=3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) <= 0.01 + 1e-6


def test_training_learns_and_evaluate_reports_accuracy_and_auc() -> None:
    model = build_mlp(6, 2, (8,), seed=0)
    before = evaluate(model, X, Y)
    plan = RoundPlan(sample_rate=0.25, steps=100, noise_multiplier=0.0)
    train_round(model, X, Y, plan=plan, train=SETTINGS.train, max_grad_norm=1.0, seed=0)
    after = evaluate(model, X, Y)
    assert after["accuracy"] > max(before["accuracy"], 0.8)
    assert 0.0 <= after["auc"] <= 1.0 and after["loss"] < before["loss"]
