"""Built-in real datasets, each with its federation schema, and table readers."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataError
from common.images import FASHION_MNIST_DIR
from common.schema import Schema

DATA_DIR = Path(__file__).resolve().parent / "data"
SCHEMAS = {
    "breast-cancer": DATA_DIR / "breast_cancer.schema.toml",
    "german-credit": DATA_DIR / "german_credit.schema.toml",
    "digits": DATA_DIR / "digits.schema.toml",
    "fashion-mnist": DATA_DIR / "fashion_mnist.schema.toml",
    "fashion-mnist-train": DATA_DIR / "fashion_mnist.schema.toml",
}


@dataclass(frozen=True)
class TabularDataset:
    """A table, the schema that describes it, and what its institutions are called."""

    name: str
    frame: pd.DataFrame
    schema: Schema
    institution_noun: str


def _breast_cancer() -> TabularDataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["diagnosis"] = bunch.target.map(dict(enumerate(bunch.target_names))).astype(str)
    schema = Schema.load(SCHEMAS["breast-cancer"])
    return TabularDataset("breast-cancer", frame, schema, "hospital")


def _german_credit() -> TabularDataset:
    frame = read_table(DATA_DIR / "german_credit.csv")
    schema = Schema.load(SCHEMAS["german-credit"])
    return TabularDataset("german-credit", frame, schema, "bank")


def _digits() -> TabularDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["digit"] = bunch.target.astype(str)
    schema = Schema.load(SCHEMAS["digits"])
    return TabularDataset("digits", frame, schema, "clinic")


def fashion_mnist(*splits: str) -> TabularDataset:
    """Fashion-MNIST's ``splits`` (``train``: 60,000 images, ``test``: 10,000), one pixel per column, as a table."""
    from common import images

    parts = [images.load_fashion_mnist(split, FASHION_MNIST_DIR) for split in splits]
    pixels = np.concatenate([p[0] for p in parts]).reshape(-1, 28 * 28) * 255.0
    labels = np.concatenate([p[1] for p in parts])
    frame = pd.DataFrame(
        pixels.round().astype(np.uint8), columns=[f"pixel_{r}_{c}" for r in range(28) for c in range(28)]
    )
    schema = Schema.load(SCHEMAS["fashion-mnist"])
    frame["label"] = np.asarray(schema.classes)[labels]
    name = "fashion-mnist" if splits == ("train", "test") else f"fashion-mnist-{'-'.join(splits)}"
    return TabularDataset(name, frame, schema, "clinic")


BUILTIN: dict[str, Callable[[], TabularDataset]] = {
    "breast-cancer": _breast_cancer,
    "german-credit": _german_credit,
    "digits": _digits,
    # All 70,000 images (train and test files together); or the official training split only,
    # to test on the official 10,000 test images as the literature does.
    "fashion-mnist": lambda: fashion_mnist("train", "test"),
    "fashion-mnist-train": lambda: fashion_mnist("train"),
}


def builtin_schema_path(name: str) -> Path:
    """The schema file of a built-in dataset (what a coordinator would distribute)."""
    if name not in SCHEMAS:
        raise ConfigError(f"unknown dataset {name!r}; built-in datasets: {sorted(BUILTIN)}")
    return SCHEMAS[name]


def load_builtin(name: str) -> TabularDataset:
    """Load one of the datasets shipped with fedsilo (or, for fashion-mnist, with Debian) by name."""
    try:
        loader = BUILTIN[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; built-in datasets: {sorted(BUILTIN)}") from None
    return loader()


TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def load_dataset(name: str, schema_path: str = "") -> TabularDataset:
    """A built-in dataset by name, or any CSV or Parquet file with the schema that describes it."""
    if name in BUILTIN or not name.lower().endswith(TABLE_SUFFIXES):
        return load_builtin(name)
    if not schema_path:
        raise ConfigError(f"dataset {name}: a table needs its federation schema; give schema-path (--schema)")
    path = Path(name)
    schema = Schema.load(schema_path)
    frame = read_table(path)
    schema.transform(frame, source=str(path))  # every record is checked before any run starts
    return TabularDataset(path.stem, frame, schema, "institution")


def read_table(path: Path | str, *, delimiter: str | None = None) -> pd.DataFrame:
    """Read a CSV (delimiter declared or detected) or Parquet file.

    Raises ``DataError`` naming the file and the fix for a missing, unreadable or
    empty file, a header without records, or duplicate column names.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    if path.suffix.lower() in {".parquet", ".pq"}:
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: cannot be read as Parquet ({err}); re-export it") from err
        _refuse_duplicates(path, [str(c) for c in frame.columns])
    else:
        frame = _read_csv(path, delimiter)
    if frame.empty:
        raise DataError(f"{path}: has a header but no records; export the rows too")
    return frame


def _refuse_duplicates(path: Path, columns: list[str]) -> None:
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names {duplicates}; give every column a unique name")


def _read_csv(path: Path, delimiter: str | None) -> pd.DataFrame:
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            sample = fh.read(65536)
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({err}); export it as UTF-8 CSV or Parquet") from err
    if not sample.strip():
        raise DataError(f"{path}: the file is empty; export the table with a header row and records")
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(sample.splitlines()[0], delimiters=",;\t|").delimiter
        except csv.Error:
            delimiter = ","
    header = next(csv.reader([sample.splitlines()[0]], delimiter=delimiter))
    _refuse_duplicates(path, [c.strip() for c in header])  # pandas would rename them silently
    try:
        return pd.read_csv(path, sep=delimiter, skipinitialspace=True, encoding="utf-8-sig")
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(
            f"{path}: cannot be parsed with delimiter {delimiter!r} ({err}); check the delimiter (--delimiter)"
        ) from err
