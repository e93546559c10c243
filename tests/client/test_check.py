"""fedsilo-client check: every kind of bad input exits 2 with an actionable message."""

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsilo.client.cli import app

RUNNER = CliRunner()
SCHEMA = """
[label]
column = "Class"
classes = ["good", "bad"]

[features.age]
type = "numeric"
min = 18
max = 100

[features.home]
type = "categorical"
categories = ["rent", "own"]

[ignore]
columns = ["note"]
"""
GOOD_ROWS = [f"{20 + i % 60},{['rent', 'own'][i % 2]},{['good', 'bad'][i % 3 == 0]},n{i % 4}" for i in range(60)]


def good_csv() -> str:
    return "age,home,Class,note\n" + "\n".join(GOOD_ROWS) + "\n"


def check(
    tmp_path: Path, data: str | None, schema: str = SCHEMA, *extra: str, name: str = "bank.csv"
) -> tuple[int, str]:
    data_path, schema_path = tmp_path / name, tmp_path / "schema.toml"
    if data is not None:
        data_path.write_text(data)
    schema_path.write_text(schema)
    before = sorted(tmp_path.iterdir())
    result = RUNNER.invoke(app, ["check", "--data", str(data_path), "--schema", str(schema_path), *extra])
    assert sorted(tmp_path.iterdir()) == before  # check never writes
    return result.exit_code, " ".join(result.output.split())


def test_a_fitting_table_gets_a_summary(tmp_path: Path) -> None:
    data = "id,age,home,Class,note\n" + "\n".join(f"{i},{row}" for i, row in enumerate(GOOD_ROWS)) + "\n"
    data = data.replace("\n20,", "\n150,", 1)  # one age above the declared maximum
    code, out = check(tmp_path, data)
    assert code == 0, out
    assert "60 records fit the schema" in out and "good 40 (67%), bad 20 (33%)" in out
    assert "ignored columns: ['note']" in out and "unexpected columns (not used): ['id']" in out
    assert "privacy warning: column 'id' is unique per record" in out


def test_parquet_is_read_too(tmp_path: Path) -> None:
    frame = pd.DataFrame([r.split(",") for r in GOOD_ROWS], columns=["age", "home", "Class", "note"])
    frame["age"] = frame["age"].astype(int)
    frame.to_parquet(tmp_path / "bank.parquet")
    code, out = check(tmp_path, None, SCHEMA, name="bank.parquet")
    assert code == 0 and "60 records fit the schema" in out


BAD: list[tuple[str, Callable[[], str | None], str, list[str], list[str]]] = [
    ("missing file", lambda: None, SCHEMA, [], ["bank.csv: no such file"]),
    ("empty file", lambda: "", SCHEMA, [], ["the file is empty"]),
    ("header only", lambda: "age,home,Class\n", SCHEMA, [], ["has a header but no records"]),
    (
        "other delimiter",
        lambda: good_csv().replace(",", ";"),
        SCHEMA,
        ["--delimiter", ","],
        ["another delimiter", "--delimiter"],
    ),
    ("missing label", lambda: good_csv().replace("Class", "Klass"), SCHEMA, [], ["label column 'Class' is missing"]),
    (
        "label outside",
        lambda: good_csv().replace(",good,", ",great,", 1),
        SCHEMA,
        [],
        ["column 'Class'", "'great'", "outside"],
    ),
    (
        "text in numeric",
        lambda: good_csv().replace("\n20,", "\nabc,", 1),
        SCHEMA,
        [],
        ["column 'age'", "non-numeric", "row 1: 'abc'"],
    ),
    (
        "nan",
        lambda: good_csv().replace("\n20,", "\n,", 1),
        SCHEMA,
        [],
        ["column 'age'", "missing or infinite", "row 1"],
    ),
    (
        "infinity",
        lambda: good_csv().replace("\n20,", "\ninf,", 1),
        SCHEMA,
        [],
        ["column 'age'", "missing or infinite", "row 1: inf"],
    ),
    (
        "unknown category",
        lambda: good_csv().replace(",rent,", ",boat,", 1),
        SCHEMA,
        [],
        ["column 'home'", "'boat'", 'unknown = "other"'],
    ),
    (
        "duplicate columns",
        lambda: good_csv().replace("age,home,Class,note", "age,home,Class,age"),
        SCHEMA,
        [],
        ["duplicate column names ['age']"],
    ),
    (
        "declared feature missing",
        lambda: good_csv().replace("home", "house"),
        SCHEMA,
        [],
        ["['home']", "missing from the file"],
    ),
    (
        "fewer than a batch",
        lambda: good_csv(),
        SCHEMA,
        ["--batch-size", "100"],
        ["60 records, fewer than the batch size 100"],
    ),
    ("delta too large", lambda: good_csv(), SCHEMA, ["--delta", "0.05"], ["delta 0.05 is not below 1/N = 1/60"]),
    (
        "unknown type",
        lambda: good_csv(),
        SCHEMA.replace('type = "numeric"', 'type = "number"'),
        [],
        ["type must be", "'number'"],
    ),
    ("min above max", lambda: good_csv(), SCHEMA.replace("min = 18", "min = 180"), [], ["finite min < max", "min=180"]),
    ("empty categories", lambda: good_csv(), SCHEMA.replace('["rent", "own"]', "[]"), [], ["non-empty categories"]),
    ("one class", lambda: good_csv(), SCHEMA.replace('["good", "bad"]', '["good"]'), [], ["at least two classes"]),
    ("schema not toml", lambda: good_csv(), "[label\n", [], ["not valid TOML"]),
]


@pytest.mark.parametrize(("case", "data", "schema", "extra", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_exits_2_naming_what_and_how_to_fix(
    tmp_path: Path, case: str, data: Callable[[], str | None], schema: str, extra: list[str], words: list[str]
) -> None:
    code, out = check(tmp_path, data(), schema, *extra)
    assert code == 2, out
    assert out.startswith("error:")
    for word in words:
        assert word in out, (case, out)
