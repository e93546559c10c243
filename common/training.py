"""Local training with DP-SGD (Abadi et al., CCS 2016) through Opacus, and evaluation.

A round is planned before it trains (sample rate, steps, noise), so its privacy
cost can be checked against the budget first and recorded exactly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import calibrate_noise
from common.errors import ConfigError
from common.metrics import MODEL_METRICS, classification_metrics
from common.settings import PrivacySettings, TrainSettings


@dataclass(frozen=True)
class RoundPlan:
    """What one round of local training will do, known before it runs."""

    sample_rate: float
    steps: int
    noise_multiplier: float  # 0.0: no DP


def plan_round(*, num_examples: int, train: TrainSettings, privacy: PrivacySettings, planned_rounds: int) -> RoundPlan:
    """Plan a round; calibrate noise so ``planned_rounds`` rounds spend the target epsilon."""
    if num_examples < 1:
        raise ConfigError("an institution needs at least one training record")
    batches = math.ceil(num_examples / train.batch_size)
    sample_rate = 1.0 / batches  # Opacus's Poisson rate for this loader
    steps = batches * train.local_epochs
    if privacy.noise_multiplier > 0:
        noise = privacy.noise_multiplier
    elif math.isfinite(privacy.target_epsilon):
        noise = calibrate_noise(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=steps * planned_rounds,
        )
    else:
        noise = 0.0
    return RoundPlan(sample_rate=sample_rate, steps=steps, noise_multiplier=noise)


def train_round(
    model: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    plan: RoundPlan,
    train: TrainSettings,
    max_grad_norm: float,
    seed: int,
) -> float:
    """Train ``model`` in place for ``plan.steps`` steps; return the mean training loss.

    With noise, Opacus DP-SGD with Poisson sampling, per-sample clipping to
    ``max_grad_norm`` and Gaussian noise; without, plain mini-batch SGD over the
    same number of steps. ``seed`` fixes batch sampling and noise.
    """
    sampler_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    dataset = TensorDataset(torch.as_tensor(inputs, dtype=torch.float32), torch.as_tensor(labels))
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, generator=sampler_gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=train.learning_rate, momentum=train.momentum)
    criterion: Any = nn.CrossEntropyLoss()
    module: nn.Module = model
    if plan.noise_multiplier > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice; seeds come from config on purpose
            made = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
                noise_generator=noise_gen,
                grad_sample_mode=train.grad_sample_mode,
            )
        if train.grad_sample_mode == "ghost":  # ghost clipping wraps the loss: it backpropagates twice
            module, optimizer, criterion, loader = made
        else:
            module, optimizer, loader = made
        if not math.isclose(getattr(loader, "sample_rate", math.nan), plan.sample_rate):
            raise RuntimeError("Opacus sample rate differs from the planned one; accounting would be wrong")
    module.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, inputs need no grad
    losses: list[float] = []
    steps = 0
    while steps < plan.steps:
        for x, y in loader:
            if steps == plan.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(y) == 0:  # an empty Poisson batch: the step still adds noise
                loss = module(x).sum() * 0.0
            else:
                loss = criterion(module(x), y)
                losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
            steps += 1
    if plan.noise_multiplier > 0:
        _detach_opacus(model)
    return float(np.mean(losses)) if losses else math.nan


def _detach_opacus(model: nn.Module) -> None:
    """Drop per-sample gradients Opacus left on the model's parameters."""
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "summed_grad", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


def evaluate(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The model's scores on these records (``common.metrics``), without the labels' own statistics.

    Loss, accuracy, balanced accuracy and, for two classes both present, ROC AUC
    and average precision. The labels' own statistics (majority-class and positive
    rate) are left out: an institution shares this dict with the coordinator, and
    its class balance is a fact about its records, not about the model.
    """
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(inputs, dtype=torch.float32))
        probabilities = torch.softmax(logits.double(), dim=1).numpy()
    metrics = classification_metrics(labels, probabilities)
    return {k: v for k, v in metrics.items() if k in MODEL_METRICS}
