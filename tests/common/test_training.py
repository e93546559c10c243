"""DP-SGD training: planned before it runs, clipped, noisy, and reproducible."""

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from common.models import build_mlp, get_weights
from common.settings import GRAD_SAMPLE_MODES, RunSettings
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
        model = build_mlp(6, 2, (8,), seed=0)
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
