"""Models are DP-ready by design: Opacus validates them strictly."""

import torch
from opacus.validators import ModuleValidator

from common.models import SmallCNN, TabularMLP, build_mlp, get_weights, set_weights


def test_models_pass_opacus_strict_validation() -> None:
    for model in (TabularMLP(30, 2, (64, 32)), SmallCNN(10), SmallCNN(10, activation="tanh")):
        ModuleValidator.validate(model, strict=True)


def test_cnn_takes_28x28_images() -> None:
    assert SmallCNN(10)(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_initial_weights_depend_only_on_the_seed() -> None:
    a, b, c = (build_mlp(8, 2, (16,), seed=s) for s in (1, 1, 2))
    assert all((x == y).all() for x, y in zip(get_weights(a), get_weights(b), strict=True))
    assert any((x != y).any() for x, y in zip(get_weights(a), get_weights(c), strict=True))
    set_weights(c, get_weights(a))
    assert all((x == y).all() for x, y in zip(get_weights(a), get_weights(c), strict=True))
