"""The federation schema: validated once, the same transform at every institution."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsilo.common.datasets import load_builtin
from fedsilo.common.errors import DataError, SchemaError
from fedsilo.common.schema import Schema

SCHEMA = {
    "label": {"column": "Class", "classes": ["good", "bad"]},
    "features": {
        "age": {"type": "numeric", "min": 18, "max": 100},
        "home": {"type": "categorical", "categories": ["rent", "own"]},
    },
}


def frame(**overrides: list[object]) -> pd.DataFrame:
    data: dict[str, list[object]] = {
        "age": [30, 200, 18],
        "home": ["own", "rent", "own"],
        "Class": ["good", "bad", "good"],
    }
    data.update(overrides)
    return pd.DataFrame(data)


def test_transform_clips_and_scales_by_declared_bounds_and_one_hot_encodes() -> None:
    inputs, labels = Schema.from_dict(SCHEMA).transform(frame())
    np.testing.assert_allclose(inputs[:, 0], [12 / 82, 1.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(inputs[:, 1:], [[0, 1], [1, 0], [0, 1]])
    np.testing.assert_array_equal(labels, [0, 1, 0])


def test_the_same_rows_transform_identically_wherever_they_sit() -> None:
    schema = Schema.from_dict(SCHEMA)
    whole, _ = schema.transform(frame())
    alone, _ = schema.transform(frame().iloc[[1]].reset_index(drop=True))
    np.testing.assert_array_equal(whole[1], alone[0])


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (frame(age=[30, "n/a", 40]), ["column 'age'", "non-numeric", "row 2: 'n/a'", "categorical"]),
        (frame(age=[30, None, 40]), ["column 'age'", "missing or infinite", 'missing = "fill"']),
        (frame(home=["own", "boat", "own"]), ["column 'home'", "row 2: 'boat'", 'unknown = "other"']),
        (frame(Class=["good", "ugly", "good"]), ["column 'Class'", "outside ['good', 'bad']", "row 2: 'ugly'"]),
        (frame().drop(columns="home"), ["['home']", "missing from the file"]),
    ],
)
def test_bad_rows_get_errors_naming_source_column_row_and_fix(data: pd.DataFrame, words: list[str]) -> None:
    with pytest.raises(DataError) as err:
        Schema.from_dict(SCHEMA).transform(data, source="bank.csv")
    message = str(err.value)
    assert message.startswith("bank.csv")
    for word in words:
        assert word in message


def test_a_malformed_schema_lists_every_problem_at_once() -> None:
    raw = {
        "label": {"column": "y", "classes": ["only"]},
        "features": {
            "a": {"type": "numeric", "min": 5, "max": 1},
            "b": {"type": "categorical", "categories": []},
            "c": {"type": "text"},
        },
    }
    with pytest.raises(SchemaError) as err:
        Schema.from_dict(raw, source="fed.toml")
    message = str(err.value)
    for word in ("fed.toml", "at least two classes", "min < max", "non-empty categories", "'text'"):
        assert word in message


def test_schema_file_that_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[label\n")
    with pytest.raises(SchemaError, match="not valid TOML"):
        Schema.load(path)


@pytest.mark.parametrize("name", ["breast-cancer", "german-credit"])
def test_builtin_datasets_fit_their_shipped_schemas(name: str) -> None:
    dataset = load_builtin(name)
    inputs, labels = dataset.schema.transform(dataset.frame)
    assert inputs.shape == (len(dataset.frame), dataset.schema.num_inputs)
    assert np.isfinite(inputs).all() and inputs.min() >= 0 and inputs.max() <= 1
    assert set(np.unique(labels)) == {0, 1}


def test_integer_categories_survive_a_missing_value_elsewhere_in_the_column() -> None:
    schema = Schema.from_dict(
        {
            "label": {"column": "y", "classes": ["0", "1"]},
            "features": {"grade": {"type": "categorical", "categories": ["1", "2"], "unknown": "other"}},
        }
    )
    inputs, labels = schema.transform(pd.DataFrame({"grade": [1, 2, None], "y": [0, 1, 1]}))
    np.testing.assert_array_equal(inputs, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(labels, [0, 1, 1])
