"""Resumable sweeps: a killed sweep resumes to an uninterrupted run's tables; failures are kept apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

import fedsilo.simulations.sweep
from fedsilo.common.errors import ConfigError
from fedsilo.simulations.cli import app
from fedsilo.simulations.sweep import run_sweep
from fedsilo.simulations.sweep_spec import SweepSpec
from fedsilo.simulations.sweep_store import SweepStore, write_json_atomically

RUNNER = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
SWEEP = ["sweep", "--dataset", "breast-cancer", "--epsilons", "2,inf", "--seeds", "0,1", "--rounds", "6"]
SWEEP += ["--institutions", "3", "--jobs", "1"]
TIMES = ["wall_s"]  # the only columns a rerun may change


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_csv(out / f"{name}.csv").drop(columns=TIMES, errors="ignore")
        for name in ("results", "rounds", "institutions", "summary")
    }


def _stamps(out: Path, run_ids: list[str]) -> dict[str, tuple[int, bytes]]:
    files = [out / "tasks" / f"{r}.json" for r in run_ids] + [out / "runs" / r / "report.json" for r in run_ids]
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["machine-lost", "ctrl-c"])
def test_a_killed_sweep_resumes_to_the_tables_of_an_uninterrupted_one(tmp_path: Path, stop: signal.Signals) -> None:
    # Prepare: the uninterrupted sweep, and the same sweep in a process stopped after its first finished task
    # (SIGKILL: nothing runs its clean-up; SIGINT: Ctrl-C at a terminal, to the whole process group)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = RUNNER.invoke(app, [*SWEEP, "--out", str(whole)])
    assert done.exit_code == 0, done.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "fedsilo.simulations.cli", *SWEEP, "--out", str(resumed)]
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as at a terminal, even under CI
        )
        try:
            deadline = time.monotonic() + 120
            while not list((resumed / "tasks").glob("*.json")) and process.poll() is None:
                assert time.monotonic() < deadline, "no task finished within 120 s"
                time.sleep(0.05)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, stop)
            process.wait(60)
    if stop == signal.SIGINT:
        text = " ".join((tmp_path / "killed.log").read_text().split())
        assert process.returncode == 130 and "interrupted:" in text and "run the same command again to resume" in text
    kept = sorted(p.stem for p in (resumed / "tasks").glob("*.json"))
    assert 1 <= len(kept) < 4, (tmp_path / "killed.log").read_text()
    assert not list((resumed / "tasks").glob(".*.tmp")) and not (resumed / "results.csv").exists()
    before = _stamps(resumed, kept)
    # Execute: the same command again
    again = RUNNER.invoke(app, [*SWEEP, "--out", str(resumed)])
    # Assert: the finished tasks were skipped, not rerun; the tables are the uninterrupted run's
    assert again.exit_code == 0, again.output
    assert f"{len(kept)} of 4 federations already finished, skipped" in " ".join(again.output.split())
    assert _stamps(resumed, kept) == before
    assert len(list((resumed / "tasks").glob("*.json"))) == 4
    expected, found = _tables(whole), _tables(resumed)
    for name, table in expected.items():
        pd.testing.assert_frame_equal(found[name], table, check_exact=True, obj=name)
    assert set(found["results"]["method"]) == {"federated", "pooled", "alone", "reference"}


def test_resuming_with_another_spec_is_refused_naming_what_differs(tmp_path: Path) -> None:
    # Prepare: a sweep directory started with 2 rounds
    SweepStore.open(tmp_path, SweepSpec(rounds=2, epsilons=(2.0,), institutions=(3,), seeds=(0,)))
    # Execute
    argv = ["sweep", "--epsilons", "2", "--institutions", "3", "--seeds", "0,1", "--rounds", "3"]
    result = RUNNER.invoke(app, [*argv, "--out", str(tmp_path)])
    # Assert
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "holds a sweep with another spec (rounds: 2 there, 3 now; seeds: [0] there, [0, 1] now)" in text
    assert "rerun it with the same settings to resume it, or choose another --out" in text
    with pytest.raises(ConfigError, match="epsilons"):
        SweepStore.open(tmp_path, SweepSpec(rounds=2, epsilons=(4.0,), institutions=(3,), seeds=(0,)))
    # Where it runs is no part of the spec: a sweep started locally may resume on a cluster.
    SweepStore.open(tmp_path, SweepSpec(rounds=2, epsilons=(2.0,), institutions=(3,), seeds=(0,), ray_address="x:1"))


def test_a_failed_task_is_reported_with_its_error_and_the_others_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the no-DP federation fails
    spec = SweepSpec(rounds=2, epsilons=(2.0, float("inf")), institutions=(3,), seeds=(0,))
    real = fedsilo.simulations.sweep.run_task

    def flaky(spec: SweepSpec, task: Any, out_dir: str) -> Any:
        if not task.level.private:
            raise RuntimeError("the node ran out of memory")
        return real(spec, task, out_dir)

    monkeypatch.setattr(fedsilo.simulations.sweep, "run_task", flaky)
    # Execute
    tables = run_sweep(spec, tmp_path, jobs=1)
    # Assert: the failure is stored with its error; the other task's rows are kept
    failures = tables["failures"]
    assert list(failures["run_id"]) == ["n=3_iid_secagg_E=2_inf_seed=0"]
    assert failures["error"].iloc[0] == "RuntimeError: the node ran out of memory"
    assert "Traceback" in failures["details"].iloc[0]
    assert set(tables["results"]["level"]) == {"eps=2"}
    assert len(list((tmp_path / "tasks").glob("*.json"))) == 1
    # Rerun: only the failed task runs again, and its failure is forgotten once it succeeds
    monkeypatch.setattr(fedsilo.simulations.sweep, "run_task", real)
    ran: list[str] = []
    tables = run_sweep(spec, tmp_path, jobs=1, on_done=lambda task: ran.append(task.run_id))
    assert ran == ["n=3_iid_secagg_E=2_inf_seed=0"]
    assert tables["failures"].empty and not list((tmp_path / "failures").glob("*.json"))
    assert set(tables["results"]["level"]) == {"eps=2", "inf"}


def test_the_cli_names_a_failed_federation_writes_failures_csv_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fedsilo.simulations.sweep.run_task

    def flaky(spec: SweepSpec, task: Any, out_dir: str) -> Any:
        if task.level.private:
            raise RuntimeError("lost node 10.0.0.7")
        return real(spec, task, out_dir)

    monkeypatch.setattr(fedsilo.simulations.sweep, "run_task", flaky)
    out = tmp_path / "out"
    argv = [*SWEEP[:5], "--seeds", "0", "--rounds", "2", "--institutions", "3", "--jobs", "1"]
    result = RUNNER.invoke(app, [*argv, "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "federation n=3_iid_secagg_E=2_eps=2_seed=0 failed: RuntimeError: lost node 10.0.0.7" in text
    assert "1 federation(s) failed (failures.csv); the others' results are written" in text
    assert list(pd.read_csv(out / "failures.csv")["run_id"]) == ["n=3_iid_secagg_E=2_eps=2_seed=0"]
    assert set(pd.read_csv(out / "results.csv", dtype={"level": str})["level"]) == {"inf"}


def test_a_task_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "tasks" / "a.json"
    write_json_atomically(path, {"x": float("inf"), "n": 1})
    with pytest.raises(TypeError):
        write_json_atomically(path, {"x": object()})
    assert json.loads(path.read_text()) == {"x": float("inf"), "n": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
