"""Built-in real datasets, each with its federation schema, and table readers.

A built-in dataset is a ``BuiltinDataset`` (its schema file in ``common/data/`` and
a loader) registered by name in ``fedsilo.common.registry.DATASETS``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedsilo.common.errors import ConfigError, DataError
from fedsilo.common.images import FASHION_MNIST_DIR
from fedsilo.common.registry import DATASETS, TABLE_SUFFIXES
from fedsilo.common.schema import Schema

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class TabularDataset:
    """A table, the schema that describes it, and what its institutions are called."""

    name: str
    frame: pd.DataFrame
    schema: Schema
    institution_noun: str


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset shipped with fedsilo: its schema (a file in ``DATA_DIR``) and how to load its table.

    ``load`` gets the schema read from ``schema_file``; the schema file alone is what a
    coordinator distributes (``builtin_schema_path``).
    """

    schema_file: str
    load: Callable[[Schema], TabularDataset]

    @property
    def schema_path(self) -> Path:
        return DATA_DIR / self.schema_file


def _breast_cancer(schema: Schema) -> TabularDataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["diagnosis"] = bunch.target.map(dict(enumerate(bunch.target_names))).astype(str)
    return TabularDataset("breast-cancer", frame, schema, "hospital")


def _german_credit(schema: Schema) -> TabularDataset:
    frame = read_table(DATA_DIR / "german_credit.csv")
    return TabularDataset("german-credit", frame, schema, "bank")


def _digits(schema: Schema) -> TabularDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame["digit"] = bunch.target.astype(str)
    return TabularDataset("digits", frame, schema, "clinic")


def fashion_mnist(*splits: str, schema: Schema | None = None) -> TabularDataset:
    """Fashion-MNIST's ``splits`` (``train``: 60,000 images, ``test``: 10,000), one pixel per column, as a table."""
    from fedsilo.common import images

    parts = [images.load_fashion_mnist(split, FASHION_MNIST_DIR) for split in splits]
    pixels = np.concatenate([p[0] for p in parts]).reshape(-1, 28 * 28) * 255.0
    labels = np.concatenate([p[1] for p in parts])
    frame = pd.DataFrame(
        pixels.round().astype(np.uint8), columns=[f"pixel_{r}_{c}" for r in range(28) for c in range(28)]
    )
    schema = schema or Schema.load(FASHION_MNIST.schema_path)
    frame["label"] = np.asarray(schema.classes)[labels]
    name = "fashion-mnist" if splits == ("train", "test") else f"fashion-mnist-{'-'.join(splits)}"
    return TabularDataset(name, frame, schema, "clinic")


BREAST_CANCER = BuiltinDataset("breast_cancer.schema.toml", _breast_cancer)
GERMAN_CREDIT = BuiltinDataset("german_credit.schema.toml", _german_credit)
DIGITS = BuiltinDataset("digits.schema.toml", _digits)
FASHION_MNIST = BuiltinDataset(
    "fashion_mnist.schema.toml", lambda schema: fashion_mnist("train", "test", schema=schema)
)
FASHION_MNIST_TRAIN = BuiltinDataset("fashion_mnist.schema.toml", lambda schema: fashion_mnist("train", schema=schema))


def builtin_schema_path(name: str) -> Path:
    """The schema file of a built-in dataset (what a coordinator would distribute)."""
    return DATASETS.get(name).schema_path


def load_builtin(name: str) -> TabularDataset:
    """Load one of the datasets shipped with fedsilo (or, for fashion-mnist, with Debian) by name."""
    builtin = DATASETS.get(name)
    return builtin.load(Schema.load(builtin.schema_path))


def load_dataset(name: str, schema_path: str = "") -> TabularDataset:
    """A built-in dataset by name, or any CSV or Parquet file with the schema that describes it."""
    if name in DATASETS or not name.lower().endswith(TABLE_SUFFIXES):
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
