"""Run directories are named by one rule."""

from datetime import datetime
from pathlib import Path

from fedsilo.server.run_naming import new_run_dir

NOW = datetime(2026, 1, 2, 3, 4, 5)


def test_run_directories_are_named_by_time_then_dataset_or_after_a_prefix() -> None:
    assert new_run_dir(Path("runs"), now=NOW) == Path("runs/20260102-030405")
    assert new_run_dir(Path("runs"), dataset="digits", now=NOW) == Path("runs/20260102-030405-digits")
    assert new_run_dir(Path("runs"), prefix="sweep", now=NOW) == Path("runs/sweep-20260102-030405")
