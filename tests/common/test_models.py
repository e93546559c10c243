"""Models are DP-ready by design: Opacus validates them strictly; one factory builds the run's model."""

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedsilo.common.datasets import builtin_schema_path
from fedsilo.common.errors import ConfigError
from fedsilo.common.models import (
    LinearModel,
    SmallCNN,
    TabularMLP,
    build_model,
    check_model_fits,
    get_weights,
    model_spec,
    set_weights,
)
from fedsilo.common.registry import ACTIVATIONS
from fedsilo.common.schema import Schema
from fedsilo.common.settings import TrainSettings
from fedsilo.common.training import RoundPlan, train_round

FASHION = Schema.load(builtin_schema_path("fashion-mnist"))
BREAST_CANCER = Schema.load(builtin_schema_path("breast-cancer"))


def test_models_pass_opacus_strict_validation() -> None:
    for model in (
        TabularMLP(30, 2, (64, 32)),
        TabularMLP(30, 2, (64,), activation="tanh"),
        SmallCNN(10),
        SmallCNN(10, activation="tanh"),
    ):
        ModuleValidator.validate(model, strict=True)


def test_cnn_takes_28x28_images() -> None:
    assert SmallCNN(10)(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_initial_weights_depend_only_on_the_seed() -> None:
    train = TrainSettings(model="mlp", hidden_layers="16")
    a, b, c = (build_model(train, BREAST_CANCER, seed=s) for s in (1, 1, 2))
    assert all((x == y).all() for x, y in zip(get_weights(a), get_weights(b), strict=True))
    assert any((x != y).any() for x, y in zip(get_weights(a), get_weights(c), strict=True))
    set_weights(c, get_weights(a))
    assert all((x == y).all() for x, y in zip(get_weights(a), get_weights(c), strict=True))


@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_every_activation_the_settings_accept_is_built(activation: str) -> None:
    model = build_model(TrainSettings(model="mlp", activation=activation), BREAST_CANCER, seed=0)
    assert any(isinstance(m, ACTIVATIONS.get(activation)) for m in model.modules())


@pytest.mark.parametrize(("kind", "activation"), [("mlp", "relu"), ("mlp", "tanh"), ("cnn", "relu"), ("cnn", "tanh")])
def test_build_model_follows_the_settings_and_the_seed(kind: str, activation: str) -> None:
    # Prepare
    train = TrainSettings(model=kind, activation=activation, hidden_layers="32")
    # Execute
    a, b, c = (build_model(train, FASHION, seed=s) for s in (3, 3, 4))
    spec = model_spec(train, FASHION, a)
    # Assert
    assert isinstance(a, SmallCNN if kind == "cnn" else TabularMLP)
    assert any(isinstance(m, ACTIVATIONS.get(activation)) for m in a.modules())
    assert not any(isinstance(m, ACTIVATIONS.get("tanh" if activation == "relu" else "relu")) for m in a.modules())
    assert all((x == y).all() for x, y in zip(get_weights(a), get_weights(b), strict=True))
    assert any((x != y).any() for x, y in zip(get_weights(a), get_weights(c), strict=True))
    assert a(torch.zeros(4, 784)).shape == (4, 10)
    assert spec["kind"] == kind and spec["activation"] == activation and spec["keys"] == list(a.state_dict())
    assert ("hidden_layers" in spec) == (kind == "mlp")


def test_build_model_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    build_model(TrainSettings(model="cnn"), FASHION, seed=5)
    assert torch.rand(1) == expected


def test_the_cnn_is_refused_for_a_schema_that_is_not_a_28x28_image() -> None:
    with pytest.raises(ConfigError) as err:
        build_model(TrainSettings(model="cnn"), BREAST_CANCER, seed=0)
    message = str(err.value)
    assert "28x28" in message and "784 numeric columns" in message and "Found 30 inputs" in message
    assert 'model = "mlp"' in message
    check_model_fits(TrainSettings(model="mlp"), BREAST_CANCER)  # the MLP takes any schema


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_cnn_trains_with_dp_sgd(activation: str) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    x = rng.random((64, 784), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    train = TrainSettings(model="cnn", activation=activation, batch_size=16)
    model = build_model(train, FASHION, seed=0)
    before = get_weights(model)
    # Execute
    loss = train_round(
        model,
        x,
        y,
        plan=RoundPlan(sample_rate=0.25, steps=3, noise_multiplier=1.0),
        train=train,
        max_grad_norm=0.1,
        seed=1,
    )
    # Assert
    assert np.isfinite(loss)
    assert any((a != b).any() for a, b in zip(before, get_weights(model), strict=True))
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in model.parameters())
    assert isinstance(model, nn.Module) and not type(model).__name__.startswith("GradSample")


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew", "ghost"])
def test_the_tanh_cnn_takes_every_opacus_grad_sample_mode(mode: str) -> None:
    """The modes simulations/benchmarks/dp_overhead.py compares all apply to the CNN the federation builds."""
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    # Prepare
    model = build_model(TrainSettings(model="cnn", activation="tanh"), FASHION, seed=0)
    before = get_weights(model)
    data = TensorDataset(torch.rand(32, 784), torch.randint(0, 10, (32,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion: nn.Module = nn.CrossEntropyLoss()
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=DataLoader(data, batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=0.1,
            grad_sample_mode=mode,
        )
        module, optimizer, *rest = made
        if mode == "ghost":
            criterion, loader = rest
        else:
            (loader,) = rest
        x, y = next(iter(loader))
        criterion(module(x), y).backward()
        optimizer.step()
    # Assert
    assert any((a != b).any() for a, b in zip(before, get_weights(model), strict=True))


def test_linear_model_is_logistic_regression_from_zero_and_trains_with_dp() -> None:
    # Prepare
    train = TrainSettings(model="linear")
    model = build_model(train, BREAST_CANCER, seed=3)
    ModuleValidator.validate(model, strict=True)
    # Execute / Assert: one weight per input and class plus a bias per class, all zero at the start
    assert isinstance(model, LinearModel)
    assert sum(p.numel() for p in model.parameters()) == (BREAST_CANCER.num_inputs + 1) * BREAST_CANCER.num_classes
    assert all((w == 0).all() for w in get_weights(model))
    rng = np.random.default_rng(0)
    x = rng.random((64, BREAST_CANCER.num_inputs)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    plan = RoundPlan(sample_rate=0.25, steps=8, noise_multiplier=1.0)
    train_round(model, x, y, plan=plan, train=train, max_grad_norm=1.0, seed=0)
    assert any((w != 0).any() for w in get_weights(model))
    assert model_spec(train, BREAST_CANCER, model)["kind"] == "linear"
