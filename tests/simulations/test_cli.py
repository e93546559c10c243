"""fedsilo-simulate refuses bad input before starting Flower, with the reason."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsilo.simulations.cli import app

RUNNER = CliRunner()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--partition", "shuffle"], "unknown partition 'shuffle'"),
        (["--partition", "column:city"], "column:city: no such column"),
        (["--institutions", "200"], "cannot be split into 200 institutions"),
        (["--delta", "2"], "'delta' must be in (0, 1). Found 2.0"),
        (["--institutions", "2"], "SecAgg+ needs at least 3 institutions"),
        (["--model", "resnet"], "'model' must be one of 'linear', 'mlp', 'cnn'. Found 'resnet'."),
        (["--activation", "gelu"], "'activation' must be one of 'relu', 'tanh'. Found 'gelu'."),
        (["--model", "cnn"], "model 'cnn' reads each record as a 28x28 grayscale image"),
    ],
)
def test_bad_options_exit_2_with_the_reason_and_write_nothing(tmp_path: Path, args: list[str], words: str) -> None:
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["run", "--out", str(out), *args])
    assert result.exit_code == 2
    assert words in " ".join(result.output.split())
    assert not out.exists()


def test_an_existing_run_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    result = RUNNER.invoke(app, ["run", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "already holds a finished run" in result.output


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max-epsilon = -1\n", "'max-epsilon' must be a number > 0"),
        ("[institutions.hospital-9]\nmax-epsilon = 1\n", "[institutions.hospital-9] names no institution"),
    ],
)
def test_a_bad_policy_file_exits_2_before_flower_starts(tmp_path: Path, text: str, words: str) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    out = tmp_path / "run"
    result = RUNNER.invoke(app, ["run", "--out", str(out), "--policy", str(policy)])
    assert result.exit_code == 2
    assert words in " ".join(result.output.split()) and str(policy) in "".join(result.output.split())
    assert not out.exists()


def test_a_csv_table_with_its_schema_runs_as_a_federation(tmp_path: Path) -> None:
    from fedsilo.common.datasets import DATA_DIR

    out = tmp_path / "run"
    args = ["run", "--dataset", str(DATA_DIR / "german_credit.csv"), "--schema"]
    args += [str(DATA_DIR / "german_credit.schema.toml"), "--engine", "inprocess", "--rounds", "2"]
    result = RUNNER.invoke(app, [*args, "--institutions", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [i["name"] for i in report["institutions"]] == ["institution-1", "institution-2", "institution-3"]
    assert sum(i["num_examples"] for i in report["institutions"]) == 799  # 1,000 records, 20% held out
    missing = RUNNER.invoke(app, ["run", "--dataset", str(DATA_DIR / "german_credit.csv"), "--out", str(out / "x")])
    assert missing.exit_code == 2 and "needs its federation schema" in missing.output
