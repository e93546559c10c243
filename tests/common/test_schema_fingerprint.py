"""A schema's fingerprint: equal for schemas that encode alike, different for any change to the encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsilo.common.datasets import DATA_DIR
from fedsilo.common.errors import ConfigError
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings

TEXT = (DATA_DIR / "german_credit.schema.toml").read_text()


def fingerprint_of(text: str, tmp_path: Path) -> str:
    path = tmp_path / "schema.toml"
    path.write_text(text, encoding="utf-8")
    return Schema.load(path).fingerprint()


def test_the_fingerprint_is_stable_and_ignores_what_does_not_encode(tmp_path: Path) -> None:
    original = Schema.load(DATA_DIR / "german_credit.schema.toml").fingerprint()
    assert len(original) == 16 and int(original, 16) >= 0
    assert fingerprint_of(TEXT, tmp_path) == original
    # Comments, integer versus float bounds and ignored columns change nothing that is encoded.
    same = "# a copy\n" + TEXT.replace("max = 20000", "max = 20000.0") + '\n[ignore]\ncolumns = ["id"]\n'
    assert fingerprint_of(same, tmp_path) == original


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('[features.foreign_worker]\ntype = "categorical"\ncategories = ["no", "yes"]\nunknown = "error"\n', ""),
        ('categories = ["no", "yes"]', 'categories = ["no", "yes", "n/a"]'),  # a category added
        ('categories = ["no", "yes"]', 'categories = ["yes", "no"]'),  # the same categories in another order
        ("max = 20000", "max = 10000"),  # a bound
        ('classes = ["good", "bad"]', 'classes = ["bad", "good"]'),  # the positive class
        ('categories = ["no", "yes"]\nunknown = "error"', 'categories = ["no", "yes"]\nunknown = "other"'),
        ('column = "creditability"', 'column = "credit_risk"'),  # the label column's name
    ],
)
def test_any_change_to_the_encoding_changes_the_fingerprint(tmp_path: Path, old: str, new: str) -> None:
    assert old in TEXT
    assert fingerprint_of(TEXT.replace(old, new, 1), tmp_path) != fingerprint_of(TEXT, tmp_path)


def test_the_proposal_carries_a_fingerprint_or_nothing() -> None:
    fingerprint = Schema.load(DATA_DIR / "german_credit.schema.toml").fingerprint()
    assert RunSettings.from_config({"schema-fingerprint": fingerprint}).data.schema_fingerprint == fingerprint
    assert RunSettings().data.schema_fingerprint == ""  # unknown: not checked
    with pytest.raises(ConfigError, match="'schema-fingerprint' must be empty"):
        RunSettings.from_config({"schema-fingerprint": "not a fingerprint"})
