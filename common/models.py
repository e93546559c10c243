"""DP-ready models: no BatchNorm, no in-place activations, Opacus-valid by design."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class TabularMLP(nn.Module):
    """A multilayer perceptron for schema-encoded tabular rows."""

    def __init__(self, num_inputs: int, num_classes: int, hidden: Sequence[int] = (64,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = num_inputs
        for units in hidden:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """The CNN of Papernot et al. (AAAI 2021) for 28x28 grayscale images, GroupNorm-free.

    ``activation="tanh"`` gives the tempered-sigmoid variant that suits DP-SGD.
    """

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        act: type[nn.Module] = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            act(),
            nn.MaxPool2d(2, 1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), act(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.view(-1, 1, 28, 28)))


def build_mlp(num_inputs: int, num_classes: int, hidden: Sequence[int], *, seed: int) -> TabularMLP:
    """An MLP whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularMLP(num_inputs, num_classes, hidden)


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's parameters as numpy arrays, in state-dict order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load numpy arrays (state-dict order) into the model."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, received {len(weights)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})
