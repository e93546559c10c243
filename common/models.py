"""The model zoo, DP-ready: no BatchNorm, no in-place activations, Opacus-valid by design.

``build_model`` is the one factory a run uses (server, institutions, baselines,
sweeps): the run settings' ``model`` and ``activation`` name a registered
``ModelKind`` and activation (``fedsilo.common.registry``), the federation schema gives
the input and output widths, a seed the initial weights. A new model is an
``nn.Module``, its ``ModelKind`` and one ``MODELS.register`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsilo.common.errors import ConfigError
from fedsilo.common.registry import ACTIVATIONS, MODELS
from fedsilo.common.schema import NumericFeature, Schema
from fedsilo.common.settings import TrainSettings

IMAGE_SIDE = 28


class TabularMLP(nn.Module):
    """A multilayer perceptron for schema-encoded tabular rows."""

    def __init__(
        self, num_inputs: int, num_classes: int, hidden: Sequence[int] = (64,), activation: str = "relu"
    ) -> None:
        super().__init__()
        act = ACTIVATIONS.get(activation)
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
        act = ACTIVATIONS.get(activation)
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


def _any_schema(schema: Schema) -> None:
    """Every schema fits: the model reads ``schema.num_inputs`` numbers."""


def _image_schema(schema: Schema) -> None:
    """The CNN reads a row as one 28x28 grayscale image: exactly 784 numeric columns, one input each."""
    pixels = sum(isinstance(f, NumericFeature) and f.width == 1 for f in schema.features)
    side = IMAGE_SIDE
    if pixels != side * side or schema.num_inputs != side * side:
        raise ConfigError(
            f"model 'cnn' reads each record as a {side}x{side} grayscale image: it needs a schema of exactly "
            f"{side * side} numeric columns (one per pixel, e.g. dataset fashion-mnist). Found "
            f"{schema.num_inputs} inputs from {len(schema.features)} features ({pixels} plain numeric). "
            'Use model = "mlp" for this schema.'
        )


def _no_spec(train: TrainSettings) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ModelKind:
    """A registered model (``fedsilo.common.registry.MODELS``): its network for a schema and what it needs.

    ``build`` makes the network from the training settings and the schema (under a
    seeded generator: ``build_model`` seeds it); ``check`` raises ``ConfigError`` when
    the schema cannot feed it; ``spec`` adds to what ``report.json`` says of it.
    """

    build: Callable[[TrainSettings, Schema], nn.Module]
    check: Callable[[Schema], None] = _any_schema
    spec: Callable[[TrainSettings], dict[str, Any]] = _no_spec


LINEAR = ModelKind(build=lambda train, schema: LinearModel(schema.num_inputs, schema.num_classes))
MLP = ModelKind(
    build=lambda train, schema: TabularMLP(
        schema.num_inputs, schema.num_classes, train.hidden_units, activation=train.activation
    ),
    spec=lambda train: {"hidden_layers": list(train.hidden_units)},
)
CNN = ModelKind(
    build=lambda train, schema: SmallCNN(schema.num_classes, activation=train.activation), check=_image_schema
)


def check_model_fits(train: TrainSettings, schema: Schema) -> None:
    """Raise ``ConfigError`` if the chosen model cannot take this schema's rows (the CNN needs 28x28 images)."""
    MODELS.get(train.model).check(schema)


def build_model(train: TrainSettings, schema: Schema, *, seed: int) -> nn.Module:
    """The run's model for ``schema``, as ``train.model`` and ``train.activation`` say.

    Initial weights depend only on ``seed`` (the global torch generator is left
    as it was). Raises ``ConfigError`` when the model does not fit the schema.
    """
    kind = MODELS.get(train.model)
    kind.check(schema)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return kind.build(train, schema)


def model_spec(train: TrainSettings, schema: Schema, model: nn.Module) -> dict[str, Any]:
    """What ``report.json`` says about the model: enough to rebuild it from the run settings."""
    spec: dict[str, Any] = {
        "kind": train.model,
        "activation": train.activation,
        "num_inputs": schema.num_inputs,
        "num_classes": schema.num_classes,
        "classes": list(schema.classes),
        **MODELS.get(train.model).spec(train),
    }
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
