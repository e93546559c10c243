"""DP-ready models: no BatchNorm, no in-place activations, Opacus-valid by design.

``build_model`` is the one factory a run uses (server, institutions, baselines,
sweeps): the run settings' ``model`` and ``activation`` choose the network, the
federation schema its input and output widths, a seed its initial weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError
from common.schema import NumericFeature, Schema
from common.settings import TrainSettings

# "tanh" is the tempered sigmoid s * sigmoid(T * x) - o of Papernot et al. (AAAI 2021)
# at their defaults s = 2, T = 2, o = 1, which is exactly tanh(x).
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
IMAGE_SIDE = 28


class TabularMLP(nn.Module):
    """A multilayer perceptron for schema-encoded tabular rows."""

    def __init__(
        self, num_inputs: int, num_classes: int, hidden: Sequence[int] = (64,), activation: str = "relu"
    ) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        layers: list[nn.Module] = []
        width = num_inputs
        for units in hidden:
            layers += [nn.Linear(width, units), act()]
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearModel(nn.Module):
    """Logistic (two classes) or softmax (more) regression on schema-encoded rows.

    Starts from zero weights, the usual start for a convex model: every class
    equally likely, and nothing for DP noise to fight against at the start.
    """

    def __init__(self, num_inputs: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_inputs, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class SmallCNN(nn.Module):
    """The CNN of Papernot et al. (AAAI 2021) for 28x28 grayscale images, GroupNorm-free.

    ``activation="tanh"`` gives the tempered-sigmoid variant that suits DP-SGD.
    """

    def __init__(self, num_classes: int = 10, activation: str = "relu") -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
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
        return self.classifier(self.features(x.view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)))


def build_mlp(num_inputs: int, num_classes: int, hidden: Sequence[int], *, seed: int) -> TabularMLP:
    """An MLP whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TabularMLP(num_inputs, num_classes, hidden)


def check_model_fits(train: TrainSettings, schema: Schema) -> None:
    """Raise ``ConfigError`` if the chosen model cannot take this schema's rows.

    The CNN reads a row as one 28x28 grayscale image, so it needs a schema of
    exactly 784 numeric columns, one input each (Fashion-MNIST's, row by row).
    """
    if train.model != "cnn":
        return
    pixels = sum(isinstance(f, NumericFeature) and f.width == 1 for f in schema.features)
    side = IMAGE_SIDE
    if pixels != side * side or schema.num_inputs != side * side:
        raise ConfigError(
            f"model 'cnn' reads each record as a {side}x{side} grayscale image: it needs a schema of exactly "
            f"{side * side} numeric columns (one per pixel, e.g. dataset fashion-mnist). Found "
            f"{schema.num_inputs} inputs from {len(schema.features)} features ({pixels} plain numeric). "
            'Use model = "mlp" for this schema.'
        )


def build_model(train: TrainSettings, schema: Schema, *, seed: int) -> nn.Module:
    """The run's model for ``schema``, as ``train.model`` and ``train.activation`` say.

    Initial weights depend only on ``seed`` (the global torch generator is left
    as it was). Raises ``ConfigError`` when the model does not fit the schema.
    """
    check_model_fits(train, schema)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if train.model == "cnn":
            return SmallCNN(schema.num_classes, activation=train.activation)
        if train.model == "linear":
            return LinearModel(schema.num_inputs, schema.num_classes)
        return TabularMLP(schema.num_inputs, schema.num_classes, train.hidden_units, activation=train.activation)


def model_spec(train: TrainSettings, schema: Schema, model: nn.Module) -> dict[str, Any]:
    """What ``report.json`` says about the model: enough to rebuild it from the run settings."""
    spec: dict[str, Any] = {
        "kind": train.model,
        "activation": train.activation,
        "num_inputs": schema.num_inputs,
        "num_classes": schema.num_classes,
        "classes": list(schema.classes),
    }
    if train.model == "mlp":
        spec["hidden_layers"] = list(train.hidden_units)
    return {**spec, "keys": list(model.state_dict().keys())}


def get_weights(model: nn.Module) -> list[np.ndarray]:
    """The model's parameters as numpy arrays, in state-dict order."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load numpy arrays (state-dict order) into the model."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, received {len(weights)}")
    model.load_state_dict({k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})
