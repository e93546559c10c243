"""Federation schema: the features and label every institution's table must have.

Preprocessing is a pure function of the schema: numeric values are clipped to
their declared bounds and scaled by them, categories are one-hot encoded in
their declared order. No statistic is computed from any institution's data, so
every institution transforms rows identically and preprocessing spends no
privacy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from fedsilo.common.errors import DataError, SchemaError
from fedsilo.common.tomlfile import read_toml

MAX_ROWS_SHOWN = 3
FINGERPRINT_LENGTH = 16  # hex digits of a schema's fingerprint (64 bits of SHA-256)


@dataclass(frozen=True)
class NumericFeature:
    """A number, clipped to ``[low, high]`` and scaled to ``[0, 1]``."""

    name: str
    low: float
    high: float
    missing: Literal["error", "fill", "indicator"] = "error"
    fill: float | None = None

    @property
    def width(self) -> int:
        return 2 if self.missing == "indicator" else 1


@dataclass(frozen=True)
class CategoricalFeature:
    """One of ``categories``, one-hot encoded (plus an "other" slot if allowed)."""

    name: str
    categories: tuple[str, ...]
    unknown: Literal["error", "other"] = "error"

    @property
    def width(self) -> int:
        return len(self.categories) + (1 if self.unknown == "other" else 0)


Feature = NumericFeature | CategoricalFeature


@dataclass(frozen=True)
class Schema:
    """A federation's table schema: features in order, and the label."""

    label: str
    classes: tuple[str, ...]
    features: tuple[Feature, ...]
    ignore: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_inputs(self) -> int:
        """Width of the model input this schema produces."""
        return sum(f.width for f in self.features)

    def fingerprint(self) -> str:
        """What determines the encoding and the model's size, hashed: equal only for schemas that encode alike.

        SHA-256 (first ``FINGERPRINT_LENGTH`` hex digits) of a canonical JSON of the label
        column, its classes in order, and every feature in order with its kind, name and
        encoding (bounds, missing-value rule and fill; categories in order and the unknown
        rule). ``ignore`` is left out: it names columns that are not read. The coordinator
        puts its schema's fingerprint in the proposal (``schema-fingerprint``); an
        institution whose own schema file gives another refuses before training.
        """
        content = {
            "label": self.label,
            "classes": list(self.classes),
            "features": [
                {"kind": "categorical" if isinstance(f, CategoricalFeature) else "numeric", **asdict(f)}
                for f in self.features
            ],
        }
        text = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:FINGERPRINT_LENGTH]

    @classmethod
    def load(cls, path: Path | str) -> Schema:
        """Read and validate a schema TOML file."""
        raw = read_toml(path, "schema file", error=SchemaError)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "schema") -> Schema:
        """Validate a parsed schema, collecting every problem before raising once."""
        problems: list[str] = []
        label = raw.get("label")
        if not isinstance(label, Mapping) or not isinstance(label.get("column"), str):
            problems.append('[label] needs column = "<name of the label column>"')
            label = {"column": "", "classes": []}
        classes = label.get("classes")
        if not isinstance(classes, list) or len(classes) < 2:
            problems.append(f"[label] classes must list at least two classes. Found {classes!r}")
            classes = []
        elif len(set(map(str, classes))) != len(classes):
            problems.append(f"[label] classes must be distinct. Found {classes!r}")
        features_raw = raw.get("features")
        if not isinstance(features_raw, Mapping) or not features_raw:
            problems.append("[features.<name>] tables: at least one feature is needed")
            features_raw = {}
        features: list[Feature] = []
        for name, spec in features_raw.items():
            try:
                features.append(_parse_feature(str(name), spec))
            except SchemaError as err:
                problems.append(str(err))
        ignore = raw.get("ignore", {}).get("columns", []) if isinstance(raw.get("ignore"), Mapping) else []
        if str(label.get("column")) in features_raw:
            problems.append(f"label column {label.get('column')!r} is also declared as a feature")
        if problems:
            raise SchemaError(f"{source} is not a valid federation schema:\n  - " + "\n  - ".join(problems))
        return cls(
            label=str(label["column"]),
            classes=tuple(str(c) for c in classes),
            features=tuple(features),
            ignore=tuple(str(c) for c in ignore),
        )

    def transform(self, frame: pd.DataFrame, *, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
        """Turn a table into model inputs (float32) and class indices (int64).

        Raises ``DataError`` naming the file, column, first offending rows and
        values, and the fix.
        """
        missing_cols = [c for c in (self.label, *(f.name for f in self.features)) if c not in frame.columns]
        if missing_cols:
            raise DataError(
                f"{source}: column(s) {missing_cols} declared in the schema are missing from the file; "
                f"columns found: {list(frame.columns)}. Rename the columns or fix the schema."
            )
        # Each column block is cast to float32 as it is made: a 784-column image table then never
        # holds a float64 copy of itself (about 1 GB less at the peak for Fashion-MNIST).
        blocks = [_encode(f, frame[f.name], source).astype(np.float32, copy=False) for f in self.features]
        inputs = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0), dtype=np.float32)
        return inputs, self.encode_labels(frame[self.label], source=source)

    def encode_labels(self, labels: pd.Series, *, source: str = "data") -> np.ndarray:
        """Class index of each label value (its position in ``classes``)."""
        text = _as_text(labels)
        index = {c: i for i, c in enumerate(self.classes)}
        codes = text.map(index)
        bad = codes.isna()
        if bad.any():
            raise DataError(
                f"{source}: column '{self.label}' (the label) has {int(bad.sum())} value(s) outside "
                f"{list(self.classes)} ({_first_rows(labels, bad)}); fix those rows or add the class to the schema"
            )
        return codes.to_numpy(dtype=np.int64)


def _parse_feature(name: str, spec: Any) -> Feature:
    where = f"[features.{name}]"
    if not isinstance(spec, Mapping):
        raise SchemaError(f"{where} must be a table")
    kind = spec.get("type")
    if kind == "numeric":
        raw_low, raw_high = spec.get("min"), spec.get("max")
        if not (_is_number(raw_low) and _is_number(raw_high)):
            raise SchemaError(
                f"{where} numeric features need numbers min and max. Found min={raw_low!r}, max={raw_high!r}"
            )
        low, high = float(raw_low), float(raw_high)  # type: ignore[arg-type]
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise SchemaError(f"{where} needs finite min < max. Found min={low}, max={high}")
        missing = spec.get("missing", "error")
        if missing not in ("error", "fill", "indicator"):
            raise SchemaError(f'{where} missing must be "error", "fill" or "indicator". Found {missing!r}')
        fill = spec.get("fill")
        if missing == "fill" and not _is_number(fill):
            raise SchemaError(f'{where} missing = "fill" needs a number fill = <value>')
        return NumericFeature(name, low, high, missing, None if fill is None else float(fill))
    if kind == "categorical":
        cats = spec.get("categories")
        if not isinstance(cats, list) or not cats:
            raise SchemaError(f"{where} categorical features need a non-empty categories list. Found {cats!r}")
        if len(set(map(str, cats))) != len(cats):
            raise SchemaError(f"{where} categories must be distinct. Found {cats!r}")
        unknown = spec.get("unknown", "error")
        if unknown not in ("error", "other"):
            raise SchemaError(f'{where} unknown must be "error" or "other". Found {unknown!r}')
        return CategoricalFeature(name, tuple(str(c) for c in cats), unknown)
    raise SchemaError(f'{where} type must be "numeric" or "categorical". Found {kind!r}')


def _as_text(column: pd.Series) -> pd.Series:
    """Values as stripped text; 3.0 reads as "3" (pandas makes integer columns float when one is missing)."""
    if pd.api.types.is_float_dtype(column):
        column = column.map(lambda v: v if pd.isna(v) else (str(int(v)) if float(v).is_integer() else str(v)))
    return column.astype("string").str.strip()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _first_rows(column: pd.Series, mask: pd.Series) -> str:
    """'first at row 37: 'n/a', row 40: ...' with 1-based data rows as a person counts them."""
    positions = np.flatnonzero(mask.to_numpy())[:MAX_ROWS_SHOWN]
    values = [column.iloc[p] for p in positions]
    shown = ", ".join(
        f"row {p + 1}: {(v.item() if isinstance(v, np.generic) else v)!r}"
        for p, v in zip(positions, values, strict=True)
    )
    return f"first at {shown}"


def _encode(feature: Feature, column: pd.Series, source: str) -> np.ndarray:
    if isinstance(feature, CategoricalFeature):
        return _encode_categorical(feature, column, source)
    return _encode_numeric(feature, column, source)


def _encode_numeric(feature: NumericFeature, column: pd.Series, source: str) -> np.ndarray:
    where = f"{source}: column '{feature.name}'"
    values = pd.to_numeric(column, errors="coerce").astype("float64")
    text_bad = values.isna() & column.notna() & (column.astype("string").str.strip() != "")
    if text_bad.any():
        raise DataError(
            f"{where} has {int(text_bad.sum())} non-numeric value(s) ({_first_rows(column, text_bad)}); "
            "clean them, or declare the column categorical"
        )
    array = values.to_numpy(dtype=np.float64, na_value=np.nan)
    absent = ~np.isfinite(array)
    if absent.any() and feature.missing == "error":
        mask = pd.Series(absent, index=column.index)
        raise DataError(
            f"{where} has {int(absent.sum())} missing or infinite value(s) ({_first_rows(column, mask)}); "
            'fill them in the file, or declare missing = "fill" (with fill = <value>) or "indicator" in the schema'
        )
    filled = np.where(absent, feature.fill if feature.fill is not None else feature.low, array)
    scaled = (np.clip(filled, feature.low, feature.high) - feature.low) / (feature.high - feature.low)
    if feature.missing == "indicator":
        return np.stack([scaled, absent.astype(np.float64)], axis=1)
    return scaled[:, None]


def _encode_categorical(feature: CategoricalFeature, column: pd.Series, source: str) -> np.ndarray:
    text = _as_text(column)
    index = {c: i for i, c in enumerate(feature.categories)}
    codes = text.map(index)
    unknown = codes.isna()
    if unknown.any() and feature.unknown == "error":
        raise DataError(
            f"{source}: column '{feature.name}' has {int(unknown.sum())} value(s) outside the declared "
            f"categories ({_first_rows(column, unknown)}); fix those rows, add the categories to the schema, "
            'or declare unknown = "other"'
        )
    out = np.zeros((len(column), feature.width), dtype=np.float64)
    slot = codes.fillna(len(feature.categories)).to_numpy(dtype=np.int64)
    out[np.arange(len(column)), slot] = 1.0
    return out
