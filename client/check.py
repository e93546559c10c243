"""``fedsilo-client check``: does an institution's table fit the federation schema?

Reads the file, validates every row against the schema and the privacy
settings, and summarises what it found. It never writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedsilo.common.datasets import read_table
from fedsilo.common.errors import DataError
from fedsilo.common.schema import NumericFeature, Schema

MIN_ROWS_FOR_ID_WARNING = 20


@dataclass(frozen=True)
class CheckSummary:
    """What ``check_table`` found in a table that fits the schema."""

    path: str
    rows: int
    label_counts: dict[str, int]
    missing: dict[str, int]
    clipped: dict[str, int]
    ignored: list[str]
    unexpected: list[str]
    identifier_like: list[str]
    num_inputs: int


def check_table(
    path: Path, schema: Schema, *, batch_size: int, delta: float, delimiter: str | None = None
) -> CheckSummary:
    """Validate every row of ``path`` against ``schema``; raise ``DataError`` on the first problem."""
    frame = read_table(path, delimiter=delimiter)
    if frame.shape[1] == 1 and len(schema.features) > 0:
        raise DataError(
            f"{path}: found one column {str(frame.columns[0])[:60]!r}; the file seems to use another "
            "delimiter than the one declared or detected; pass --delimiter (e.g. --delimiter ';')"
        )
    if schema.label not in frame.columns:
        raise DataError(
            f"{path}: the label column '{schema.label}' is missing; columns found: {list(frame.columns)}. "
            "Rename the column or fix [label] column in the schema."
        )
    _, labels = schema.transform(frame, source=str(path))
    rows = len(frame)
    if rows < batch_size:
        raise DataError(
            f"{path}: {rows} records, fewer than the batch size {batch_size}: DP-SGD samples batches of "
            "about that size from the records; lower batch-size or join with more records"
        )
    if delta >= 1.0 / rows:
        raise DataError(
            f"{path}: delta {delta:g} is not below 1/N = 1/{rows}: such a delta allows leaking a whole "
            f"record; choose delta below {1.0 / rows:.2g}"
        )
    declared = {schema.label, *(f.name for f in schema.features)}
    clipped = {}
    for feature in schema.features:
        if isinstance(feature, NumericFeature):
            values = pd.to_numeric(frame[feature.name], errors="coerce")
            clipped[feature.name] = int(((values < feature.low) | (values > feature.high)).sum())
    return CheckSummary(
        path=str(path),
        rows=rows,
        label_counts={c: int((labels == i).sum()) for i, c in enumerate(schema.classes)},
        missing={name: int(frame[name].isna().sum()) for name in sorted(declared)},
        clipped=clipped,
        ignored=[c for c in schema.ignore if c in frame.columns],
        unexpected=[str(c) for c in frame.columns if c not in declared and c not in schema.ignore],
        identifier_like=[str(c) for c in frame.columns if c != schema.label and _looks_like_identifier(frame[c])],
        num_inputs=schema.num_inputs,
    )


def _looks_like_identifier(column: pd.Series) -> bool:
    """Unique per row, and text or integers (continuous measurements are often unique too)."""
    if len(column) < MIN_ROWS_FOR_ID_WARNING or pd.api.types.is_float_dtype(column):
        return False
    return bool(column.nunique(dropna=False) == len(column))
