"""Partitioners: disjoint, complete, and the same split for the same seed."""

import numpy as np
import pandas as pd
import pytest

from fedsilo.common.errors import ConfigError
from fedsilo.common.partition import partition

LABELS = np.array([0] * 60 + [1] * 40)
FRAME = pd.DataFrame({"region": ["north"] * 50 + ["south"] * 30 + ["east"] * 20})


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "column:region"])
def test_partitions_are_disjoint_and_cover_every_row(spec: str) -> None:
    parts = partition(spec, FRAME, LABELS, 3, np.random.default_rng(0))
    rows = np.concatenate(parts)
    assert len(parts) == 3 and sorted(rows.tolist()) == list(range(100))


def test_same_seed_same_split_other_seed_other_split() -> None:
    first = partition("dirichlet:0.5", FRAME, LABELS, 4, np.random.default_rng(7))
    again = partition("dirichlet:0.5", FRAME, LABELS, 4, np.random.default_rng(7))
    other = partition("dirichlet:0.5", FRAME, LABELS, 4, np.random.default_rng(8))
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(first, other, strict=True))


def test_small_alpha_skews_labels_more_than_iid() -> None:
    def skew(spec: str) -> float:
        parts = partition(spec, FRAME, LABELS, 4, np.random.default_rng(3))
        return float(np.std([LABELS[p].mean() for p in parts]))

    assert skew("dirichlet:0.1") > skew("iid")


def test_column_split_keeps_each_value_at_one_institution() -> None:
    parts = partition("column:region", FRAME, LABELS, 3, np.random.default_rng(0))
    assert sorted(FRAME["region"].iloc[p].nunique() for p in parts) == [1, 1, 1]


@pytest.mark.parametrize(
    ("spec", "count", "words"),
    [
        ("shuffle", 3, "unknown partition"),
        ("dirichlet:-1", 3, "ALPHA > 0"),
        ("column:city", 3, "no such column"),
        ("column:region", 4, "3 distinct values"),
        ("iid", 20, "at least 8 records"),
    ],
)
def test_bad_specs_explain_themselves(spec: str, count: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        partition(spec, FRAME, LABELS, count, np.random.default_rng(0))
