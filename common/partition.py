"""Partitioners that split one table into institutions: iid, label skew, natural split.

Each is a pure function of the labels (or a column), the number of
institutions and a ``numpy.random.Generator``: the same seed gives the same split.
A partitioner has the ``Partitioner`` shape and is registered by name in
``fedsilo.common.registry.PARTITIONERS``; a partition spec is ``NAME`` or ``NAME:ARGUMENT``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from fedsilo.common.errors import ConfigError
from fedsilo.common.registry import PARTITIONERS

MIN_RECORDS = 8
MAX_DIRICHLET_DRAWS = 100


class Partitioner(Protocol):
    """Row indices of each of ``n`` institutions; ``arg`` is what follows ``NAME:`` in the spec ("" if nothing)."""

    def __call__(
        self, arg: str, frame: pd.DataFrame, labels: np.ndarray, n: int, rng: np.random.Generator, /
    ) -> list[np.ndarray]: ...


def partition(
    spec: str, frame: pd.DataFrame, labels: np.ndarray, num_institutions: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices of each institution for a partition spec.

    ``iid``: shuffled, equal shares. ``dirichlet:ALPHA``: each class spread over the
    institutions by Dirichlet(ALPHA) proportions (Hsu et al., 2019), smaller ALPHA
    meaning more label skew. ``column:NAME``: the natural split by a column's
    values, grouped into ``num_institutions`` groups of similar size.
    """
    if num_institutions < 1:
        raise ConfigError(f"the number of institutions must be >= 1. Found {num_institutions}.")
    if num_institutions * MIN_RECORDS > len(labels):
        raise ConfigError(
            f"{len(labels)} records cannot be split into {num_institutions} institutions of at "
            f"least {MIN_RECORDS} records; use fewer institutions"
        )
    kind, _, arg = spec.partition(":")
    if kind not in PARTITIONERS:
        raise PARTITIONERS.unknown(spec)
    parts = PARTITIONERS.get(kind)(arg, frame, labels, num_institutions, rng)
    return [np.sort(p) for p in parts]


def iid(arg: str, frame: pd.DataFrame, labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled, equal shares."""
    if arg:
        raise PARTITIONERS.unknown(f"iid:{arg}")
    return np.array_split(rng.permutation(len(labels)), n)


def _alpha(arg: str) -> float:
    try:
        alpha = float(arg)
    except ValueError:
        alpha = -1.0
    if not alpha > 0:
        raise ConfigError(f"dirichlet:ALPHA needs ALPHA > 0, e.g. dirichlet:0.5. Found {arg!r}.")
    return alpha


def dirichlet(arg: str, frame: pd.DataFrame, labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class spread over the institutions by Dirichlet(ALPHA) proportions (Hsu et al., 2019)."""
    alpha = _alpha(arg)
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[int]] = [[] for _ in range(n)]
        for cls in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(members)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_RECORDS:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise ConfigError(
        f"dirichlet:{alpha} left an institution with fewer than {MIN_RECORDS} records in "
        f"{MAX_DIRICHLET_DRAWS} draws; use a larger ALPHA or fewer institutions"
    )


def by_column(
    column: str, frame: pd.DataFrame, labels: np.ndarray, n: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """The natural split by a column's values, grouped into ``n`` groups of similar size."""
    if not column:
        raise PARTITIONERS.unknown("column")
    if column not in frame.columns:
        raise ConfigError(f"column:{column}: no such column; columns: {list(frame.columns)}")
    groups = frame.groupby(frame[column].astype(str), sort=True).indices
    if len(groups) < n:
        raise ConfigError(
            f"column:{column} has {len(groups)} distinct values ({sorted(groups)}), fewer than "
            f"{n} institutions; use at most {len(groups)} institutions"
        )
    bins: list[list[int]] = [[] for _ in range(n)]
    for _, rows in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        min(bins, key=len).extend(rows.tolist())
    return [np.asarray(b, dtype=np.int64) for b in bins]
