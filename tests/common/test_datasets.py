"""Built-in datasets load offline, transform by their schema, and name a missing package's install command."""

from pathlib import Path

import numpy as np
import pytest

from fedsilo.common import datasets
from fedsilo.common.datasets import DATA_DIR, builtin_schema_path, load_builtin, load_dataset
from fedsilo.common.errors import ConfigError, FedsiloError


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


def test_any_csv_or_parquet_table_with_its_schema_is_a_dataset(tmp_path: Path) -> None:
    builtin = load_builtin("german-credit")
    schema = str(builtin_schema_path("german-credit"))
    parquet = tmp_path / "credit.parquet"
    builtin.frame.to_parquet(parquet)
    for path in (DATA_DIR / "german_credit.csv", parquet):
        table = load_dataset(str(path), schema)
        assert table.name == path.stem and table.institution_noun == "institution"
        expected = builtin.schema.transform(builtin.frame, source="builtin")
        got = table.schema.transform(table.frame, source=str(path))
        assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))


def test_a_table_without_a_schema_or_with_bad_records_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs its federation schema"):
        load_dataset(str(DATA_DIR / "german_credit.csv"))
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(FedsiloError, match=r"bad\.csv"):
        load_dataset(str(bad), str(builtin_schema_path("german-credit")))


def test_fashion_mnist_is_read_from_debians_idx_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    rng = np.random.default_rng(0)
    for prefix, count in (("train", 3), ("t10k", 2)):
        pixels = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        header = (2051).to_bytes(4, "big") + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
        labels = np.arange(count, dtype=np.uint8) + (0 if prefix == "train" else 7)
        label_header = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path)
    dataset = load_builtin("fashion-mnist")
    x, y = dataset.schema.transform(dataset.frame, source=dataset.name)
    assert x.shape == (5, 784) and y.tolist() == [0, 1, 2, 7, 8]
    assert dataset.frame["label"].tolist()[:2] == ["T-shirt/top", "Trouser"]
    assert x.min() >= 0.0 and x.max() <= 1.0
    official_train = load_builtin("fashion-mnist-train")
    assert official_train.schema.transform(official_train.frame)[1].tolist() == [0, 1, 2]
