"""Built-in real datasets, each with its federation schema, and table readers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from common.errors import ConfigError, DataError
from common.schema import Schema

DATA_DIR = Path(__file__).resolve().parent / "data"
SCHEMAS = {
    "breast-cancer": DATA_DIR / "breast_cancer.schema.toml",
    "german-credit": DATA_DIR / "german_credit.schema.toml",
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


BUILTIN: dict[str, Callable[[], TabularDataset]] = {
    "breast-cancer": _breast_cancer,
    "german-credit": _german_credit,
}


def builtin_schema_path(name: str) -> Path:
    """The schema file of a built-in dataset (what a coordinator would distribute)."""
    if name not in SCHEMAS:
        raise ConfigError(f"unknown dataset {name!r}; built-in datasets: {sorted(BUILTIN)}")
    return SCHEMAS[name]


def load_builtin(name: str) -> TabularDataset:
    """Load one of the datasets shipped with fedsilo by name."""
    try:
        loader = BUILTIN[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; built-in datasets: {sorted(BUILTIN)}") from None
    return loader()


def read_table(path: Path | str) -> pd.DataFrame:
    """Read a CSV (delimiter detected) or Parquet file, with a clear error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=None, engine="python", skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read as a table ({err}); export it as CSV or Parquet") from err
