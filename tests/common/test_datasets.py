"""Built-in datasets load offline, transform by their schema, and name a missing package's install command."""

from pathlib import Path

import pytest

from common import datasets
from common.datasets import load_builtin
from common.errors import ConfigError


def test_digits_are_64_pixels_in_ten_classes_scaled_by_the_schema() -> None:
    dataset = load_builtin("digits")
    x, y = dataset.schema.transform(dataset.frame, source=dataset.name)
    assert x.shape == (1797, 64) and dataset.schema.num_classes == 10
    assert x.min() == 0.0 and x.max() == 1.0 and sorted(set(y.tolist())) == list(range(10))


def test_fashion_mnist_without_its_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_builtin("fashion-mnist")
