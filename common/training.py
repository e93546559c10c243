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

from fedsilo.common.accounting import SkellamEvent, calibrate_noise
from fedsilo.common.errors import ConfigError
from fedsilo.common.metrics import MODEL_METRICS, classification_metrics
from fedsilo.common.settings import PrivacySettings, TrainSettings


@dataclass(frozen=True)
class RoundPlan:
    """What one round of local training will do, known before it runs.

    ``batch_size`` is the loader's batch (with Poisson sampling, the expected
    batch); 0 means "as the training settings say", or ``sample_rate`` x records
    when those say "auto" too. ``planned_steps`` counts the local steps of the
    whole run (0: this round's), which the recipe's learning rate follows.
    """

    sample_rate: float
    steps: int
    noise_multiplier: float  # 0.0: no DP
    batch_size: int = 0
    planned_steps: int = 0


# The default recipe (``batch-size = 0``, ``learning-rate = 0``: "auto") uses public facts only:
# the institution's record count, the planned rounds and local epochs, the noise multiplier
# (from epsilon), the clipping norm, the momentum and the model's size. Never the records'
# values. README "The DP training recipe" gives the reasoning and the evidence.
AUTO_STEPS_PER_EPOCH = 16  # expected batch n / 16: a local epoch takes about 16 noisy steps
AUTO_MIN_BATCH = 32  # below it, each step's noise (sigma * C / batch) swamps its signal
AUTO_MAX_BATCH = 1024  # past it, the noise per step is negligible and batches only cost memory
# How far the weights may travel over the run, lr * C * steps / (1 - momentum) in units of the
# clipping norm, is set so that the noise the steps accumulate in the weights, about
# travel * sigma * sqrt(parameters) / (batch * sqrt(steps)), stays near AUTO_NOISE_IN_WEIGHTS;
# without noise (or with little), the travel is AUTO_MAX_TRAVEL, enough to converge.
AUTO_NOISE_IN_WEIGHTS = 25.0
AUTO_MAX_TRAVEL = 1000.0


def auto_batch_size(num_examples: int) -> int:
    """The recipe's expected batch for ``num_examples`` records (a public count)."""
    batch = max(AUTO_MIN_BATCH, math.ceil(num_examples / AUTO_STEPS_PER_EPOCH))
    return max(1, min(num_examples, AUTO_MAX_BATCH, batch))


def auto_learning_rate(
    *,
    num_parameters: int,
    noise_multiplier: float,
    expected_batch: float,
    total_steps: int,
    max_grad_norm: float,
    momentum: float,
) -> float:
    """The recipe's SGD learning rate: a travel budget spread over the run's ``total_steps``.

    Every step moves the weights by at most ``lr * C / (1 - momentum)`` of clipped
    gradient, and adds Gaussian noise of ``lr * sigma * C / batch`` per coordinate;
    over ``T`` steps the noise grows as ``sqrt(T)`` and the signal as ``T``. The
    travel ``D = lr * C * T / (1 - momentum)`` is chosen so that the noise left in
    the weights, ``D * sigma * sqrt(P) / (batch * sqrt(T))`` for ``P`` parameters,
    is ``AUTO_NOISE_IN_WEIGHTS``, and at most ``AUTO_MAX_TRAVEL``.
    """
    steps = max(1, total_steps)
    travel = AUTO_MAX_TRAVEL
    if noise_multiplier > 0:
        spread = noise_multiplier * math.sqrt(max(1, num_parameters)) / (max(expected_batch, 1.0) * math.sqrt(steps))
        travel = min(travel, AUTO_NOISE_IN_WEIGHTS / spread)
    return travel * (1.0 - momentum) / (max_grad_norm * steps)


def step_size(
    model: nn.Module, plan: RoundPlan, *, train: TrainSettings, num_examples: int, max_grad_norm: float
) -> float:
    """The learning rate a round trains with: the settings' own, else the recipe's for this model and plan."""
    if train.learning_rate > 0:
        return train.learning_rate
    return auto_learning_rate(
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        noise_multiplier=plan.noise_multiplier,
        expected_batch=plan.sample_rate * num_examples,
        total_steps=plan.planned_steps or plan.steps,
        max_grad_norm=max_grad_norm,
        momentum=train.momentum,
    )


def plan_round(
    *,
    num_examples: int,
    train: TrainSettings,
    privacy: PrivacySettings,
    planned_rounds: int,
    alongside: tuple[SkellamEvent, ...] = (),
) -> RoundPlan:
    """Plan a round; calibrate noise so ``planned_rounds`` rounds spend the target epsilon.

    ``train.batch_size = 0`` takes the recipe's expected batch (``auto_batch_size``),
    which depends only on the record count. ``alongside``: the run's planned secure
    evaluations (``fedsilo.common.secure_evaluation.evaluation_events``), which the
    rounds compose with to spend the target.
    """
    if num_examples < 1:
        raise ConfigError("an institution needs at least one training record")
    batch_size = train.batch_size or auto_batch_size(num_examples)
    batches = math.ceil(num_examples / batch_size)
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
            accountant=privacy.accountant,
            neighbouring=privacy.neighbouring,
            alongside=alongside,
        )
    else:
        noise = 0.0
    return RoundPlan(
        sample_rate=sample_rate,
        steps=steps,
        noise_multiplier=noise,
        batch_size=batch_size,
        planned_steps=steps * planned_rounds,
    )


def train_round(
    model: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    plan: RoundPlan,
    train: TrainSettings,
    max_grad_norm: float,
    seed: int,
    weight_bound: float | None = None,
) -> float:
    """Train ``model`` in place for ``plan.steps`` steps; return the mean training loss.

    ``weight_bound`` keeps every parameter in ``[-weight_bound, weight_bound]``
    after every step (projected SGD, post-processing of each DP-SGD step): an
    update that goes through SecAgg+ is then never clipped silently by its
    ``secagg-clipping-range``.

    With noise, Opacus DP-SGD with Poisson sampling, per-sample clipping to
    ``max_grad_norm`` and Gaussian noise; without, plain mini-batch SGD over the
    same number of steps. ``seed`` fixes batch sampling and noise.
    """
    sampler_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    dataset = TensorDataset(torch.as_tensor(inputs, dtype=torch.float32), torch.as_tensor(labels))
    batch_size = plan.batch_size or train.batch_size or max(1, math.ceil(len(labels) * plan.sample_rate))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=sampler_gen)
    learning_rate = step_size(model, plan, train=train, num_examples=len(labels), max_grad_norm=max_grad_norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=train.momentum)
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
            if weight_bound is not None:
                with torch.no_grad():
                    for p in model.parameters():
                        p.clamp_(-weight_bound, weight_bound)
            steps += 1
    if plan.noise_multiplier > 0:
        _detach_opacus(model)
    return float(np.mean(losses)) if losses else math.nan


# Records whose per-record gradients are computed at once (distributed DP's clipped sum).
GRADIENT_CHUNK = 256


def clipped_gradient_sum(
    model: nn.Module,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    sample_rate: float,
    max_grad_norm: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """The sum of per-record gradients, each clipped to ``max_grad_norm``, over a Poisson sample.

    Each record is in the sample independently with probability ``sample_rate``, drawn from
    ``rng`` (secret randomness in a deployment). What distributed DP's round sends, before its
    encoding and noise share (Abadi et al., CCS 2016, without the noise). A record's gradient
    that is not finite counts as zero, so no record can make the sum non-finite; with every
    clipped gradient at most ``max_grad_norm`` long, one record moves the sum by at most that.
    Returns the sum (float64, flat, in ``get_weights`` order) and the sample's size.
    """
    from torch.func import functional_call, grad, vmap

    chosen = np.flatnonzero(rng.random(len(labels)) < sample_rate)
    names = list(model.state_dict().keys())
    params = {k: v.detach() for k, v in model.named_parameters()}
    if set(params) != set(names):
        raise ValueError("distributed DP needs a model whose state is its parameters (no buffers)")
    total = torch.zeros(sum(params[k].numel() for k in names), dtype=torch.float64)
    if len(chosen) == 0:
        return total.numpy(), 0

    def loss_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_record = vmap(grad(loss_of), in_dims=(None, 0, 0))
    model.eval()  # no layer of the zoo behaves differently; the functional call must not record state
    for start in range(0, len(chosen), GRADIENT_CHUNK):
        rows = chosen[start : start + GRADIENT_CHUNK]
        x = torch.as_tensor(inputs[rows], dtype=torch.float32)
        y = torch.as_tensor(labels[rows])
        per_name = per_record(params, x, y)
        grads = [per_name[k].reshape(len(rows), -1) for k in names]
        # Each record's norm over every parameter, in float64 (a non-finite entry makes it non-finite)
        squared = sum(torch.linalg.vector_norm(g, dim=1, dtype=torch.float64) ** 2 for g in grads)
        finite = torch.isfinite(squared)
        norm = torch.where(finite, squared, torch.zeros_like(squared)).sqrt()
        factor = torch.where(finite, (max_grad_norm / (norm + 1e-12)).clamp(max=1.0), torch.zeros_like(norm))
        offset = 0
        for g in grads:
            if not bool(finite.all()):
                g = torch.where(finite[:, None], g, torch.zeros_like(g))  # a non-finite record counts as zero
            total[offset : offset + g.shape[1]] += factor @ g.double()
            offset += g.shape[1]
    return total.numpy(), len(chosen)


def _detach_opacus(model: nn.Module) -> None:
    """Drop per-sample gradients Opacus left on the model's parameters."""
    for p in model.parameters():
        for attr in ("grad_sample", "_forward_counter", "summed_grad", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


PREDICT_BATCH = 4096  # records per forward pass when predicting


def predict_proba(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    """A torch model's class probabilities (float64, computed from the logits in batches)."""
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, max(len(inputs), 1), PREDICT_BATCH):
            logits = model(torch.as_tensor(inputs[start : start + PREDICT_BATCH], dtype=torch.float32))
            parts.append(torch.softmax(logits.double(), dim=1).numpy())
    return np.concatenate(parts)


def evaluate(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The model's scores on these records (``fedsilo.common.metrics``), without the labels' own statistics.

    Loss, accuracy, balanced accuracy and, for two classes both present, ROC AUC
    and average precision. The labels' own statistics (majority-class and positive
    rate) are left out: an institution shares this dict with the coordinator, and
    its class balance is a fact about its records, not about the model. The scores
    are not DP-protected and can still reveal it (a constant model's accuracy is a
    class's share): deployed institutions share them only by policy.
    """
    metrics = classification_metrics(labels, predict_proba(model, inputs))
    return {k: v for k, v in metrics.items() if k in MODEL_METRICS}
