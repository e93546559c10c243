"""Registries: an unknown name is refused with the registered ones, and one registration extends the run."""

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedsilo.common.datasets import BuiltinDataset, TabularDataset, builtin_schema_path, load_builtin, load_dataset
from fedsilo.common.errors import ConfigError
from fedsilo.common.models import ModelKind, build_model, model_spec
from fedsilo.common.partition import partition
from fedsilo.common.registry import ACTIVATIONS, DATASETS, MODELS, PARTITIONERS, Registry
from fedsilo.common.schema import Schema
from fedsilo.common.settings import DataSettings, RunSettings, TrainSettings

BREAST_CANCER = Schema.load(builtin_schema_path("breast-cancer"))


class Constant(nn.Module):
    """A toy model: one learnable logit per class, whatever the input."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


@pytest.fixture
def constant_model() -> Iterator[str]:
    MODELS.register(
        "constant",
        ModelKind(build=lambda train, schema: Constant(schema.num_classes), spec=lambda train: {"toy": True}),
    )
    yield "constant"
    MODELS.unregister("constant")


def test_a_registry_lists_names_in_order_and_refuses_an_unknown_one_listing_them() -> None:
    # Prepare
    colours: Registry[int] = Registry("colour")
    colours.register("red", 1)
    colours.register("green", 2)
    # Execute / Assert
    assert colours.names() == ("red", "green") and list(colours) == ["red", "green"] and "red" in colours
    assert colours.get("green") == 2
    with pytest.raises(ConfigError, match=r"^unknown colour 'blue'; use red or green$"):
        colours.get("blue")


def test_a_registry_registers_by_decorator_refuses_a_twin_and_imports_lazily_on_first_get() -> None:
    registry: Registry[object] = Registry("thing")

    @registry.register("f")
    def f() -> int:
        return 1

    registry.register("path", "os.path:join")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("f", f)
    registry.register("f", 2, replace=True)
    import os.path

    assert registry.get("f") == 2 and registry.get("path") is os.path.join and f() == 1


@pytest.mark.parametrize(
    ("registry", "words"),
    [
        (MODELS, "unknown model 'resnet'; use linear, mlp or cnn"),
        (ACTIVATIONS, "unknown activation 'resnet'; use relu or tanh"),
        (DATASETS, "unknown dataset 'resnet'; use breast-cancer, german-credit, digits, fashion-mnist or"),
        (PARTITIONERS, "unknown partition 'resnet'; use iid, dirichlet:ALPHA or column:NAME"),
    ],
)
def test_every_registry_refuses_an_unknown_name_listing_the_registered_ones(registry: Registry, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        registry.get("resnet")


def test_every_registered_builtin_resolves() -> None:
    assert all(isinstance(MODELS.get(n), ModelKind) for n in MODELS)
    assert all(issubclass(ACTIVATIONS.get(n), nn.Module) for n in ACTIVATIONS)
    assert all(isinstance(DATASETS.get(n), BuiltinDataset) and DATASETS.get(n).schema_path.is_file() for n in DATASETS)
    assert all(callable(PARTITIONERS.get(n)) for n in PARTITIONERS)


def test_settings_validate_against_the_registries() -> None:
    with pytest.raises(ConfigError, match=r"'model' must be one of 'linear', 'mlp', 'cnn'\. Found 'resnet'\."):
        TrainSettings(model="resnet")
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; use breast-cancer, .* or a CSV/Parquet file"):
        DataSettings(dataset="mnist")
    with pytest.raises(ConfigError, match="unknown partition 'shuffle:2'; use iid, dirichlet:ALPHA or column:NAME"):
        RunSettings.from_config({"partition": "shuffle:2"})
    assert DataSettings(dataset="/data/credit.parquet", partition="column:region").partition == "column:region"


def test_reading_the_settings_imports_neither_torch_nor_pandas() -> None:
    code = (
        "import sys; from fedsilo.common.settings import RunSettings; "
        "RunSettings.from_config({'model': 'cnn', 'activation': 'tanh', 'partition': 'dirichlet:0.5'}); "
        "print(sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_one_registration_makes_the_settings_accept_a_model_and_build_model_build_it(constant_model: str) -> None:
    # Prepare
    train = RunSettings.from_config({"model": constant_model}).train
    # Execute
    a, b = (build_model(train, BREAST_CANCER, seed=7) for _ in range(2))
    # Assert
    assert isinstance(a, Constant) and isinstance(b, Constant) and torch.equal(a.logits, b.logits)
    assert a(torch.zeros(3, BREAST_CANCER.num_inputs)).shape == (3, 2)
    assert model_spec(train, BREAST_CANCER, a)["toy"] is True
    with pytest.raises(ConfigError, match="'linear', 'mlp', 'cnn', 'constant'"):
        TrainSettings(model="resnet")


def test_once_unregistered_a_model_is_refused_again(constant_model: str) -> None:
    MODELS.unregister(constant_model)
    with pytest.raises(ConfigError, match="Found 'constant'"):
        TrainSettings(model=constant_model)


def test_one_registration_adds_a_dataset() -> None:
    # Prepare
    rows = load_builtin("breast-cancer").frame.head(40)
    DATASETS.register(
        "tiny-cancer",
        BuiltinDataset("breast_cancer.schema.toml", lambda schema: TabularDataset("tiny-cancer", rows, schema, "ward")),
    )
    try:
        # Execute
        settings = RunSettings.from_config({"dataset": "tiny-cancer"})
        table = load_dataset(settings.data.dataset)
        # Assert
        assert len(table.frame) == 40 and table.institution_noun == "ward"
        assert builtin_schema_path("tiny-cancer") == builtin_schema_path("breast-cancer")
    finally:
        DATASETS.unregister("tiny-cancer")


def test_one_registration_adds_a_partitioner() -> None:
    # Prepare
    labels = np.array([0, 1] * 20)

    def halves(arg: str, frame: pd.DataFrame, labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        return np.array_split(np.arange(len(labels)), n)

    PARTITIONERS.register("halves", halves)
    try:
        # Execute
        spec = RunSettings.from_config({"partition": "halves"}).data.partition
        parts = partition(spec, pd.DataFrame(), labels, 2, np.random.default_rng(0))
        # Assert
        assert [p.tolist() for p in parts] == [list(range(20)), list(range(20, 40))]
    finally:
        PARTITIONERS.unregister("halves")
