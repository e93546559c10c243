"""fedsilo-simulate refuses bad input before starting Flower, with the reason."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app

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
