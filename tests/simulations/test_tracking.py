"""Experiment tracking: runs and sweeps write TensorBoard event files holding their round metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from fedsilo.common.errors import ConfigError
from fedsilo.simulations.cli import app
from fedsilo.simulations.tracking import RunTracker

RUNNER = CliRunner()


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_run_writes_each_rounds_metrics_and_epsilon(tmp_path: Path) -> None:
    # Execute
    board, out = tmp_path / "board", tmp_path / "run"
    args = ["run", "--engine", "inprocess", "--dataset", "breast-cancer", "--institutions", "3", "--rounds", "2"]
    result = RUNNER.invoke(app, [*args, "--out", str(out), "--tensorboard", str(board)])
    # Assert: one scalar per round for every metric, equal to the run's own metrics.csv
    assert result.exit_code == 0, result.output
    assert list(board.glob("events.out.tfevents.*"))
    scalars = _scalars(board)
    metrics = pd.read_csv(out / "metrics.csv")
    for key in ("auc", "accuracy", "max_epsilon", "institutions_trained"):
        steps = [step for step, _ in scalars[f"round/{key}"]]
        values = [value for _, value in scalars[f"round/{key}"]]
        assert steps == [1, 2]
        assert values == pytest.approx(metrics[key].tolist(), rel=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert scalars["round/max_epsilon"][-1][1] == pytest.approx(report["max_epsilon"], rel=1e-6)


def test_a_sweep_writes_each_federation_and_its_summary(tmp_path: Path) -> None:
    board, out = tmp_path / "board", tmp_path / "sweep"
    args = ["sweep", "--epsilons", "2,inf", "--seeds", "0", "--rounds", "2", "--institutions", "3", "--jobs", "1"]
    result = RUNNER.invoke(app, [*args, "--out", str(out), "--tensorboard", str(board)])
    assert result.exit_code == 0, result.output
    rounds = pd.read_csv(out / "rounds.csv")
    results = pd.read_csv(out / "results.csv")
    for run_id in rounds["run_id"].unique():
        scalars = _scalars(board / run_id)
        mine = rounds[rounds["run_id"] == run_id]
        assert [s for s, _ in scalars["round/auc"]] == mine["round"].tolist()
        assert [v for _, v in scalars["round/auc"]] == pytest.approx(mine["auc"].tolist(), rel=1e-6)
        federated = results[(results["run_id"] == run_id) & (results["method"] == "federated")].iloc[0]
        assert scalars["final/federated/auc"][0][1] == pytest.approx(federated["auc"], rel=1e-6)
        assert "final/pooled/attack_auc" in scalars
    summary = _scalars(board / "sweep")
    assert [step for step, _ in summary["sweep/federated/auc_mean"]] == [0, 1]  # eps=2, then no DP


def test_tracking_without_tensorboard_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'fedsilo\[tracking\]'"):
        RunTracker(tmp_path)
    result = RUNNER.invoke(app, ["run", "--out", str(tmp_path / "r"), "--tensorboard", str(tmp_path / "b")])
    assert result.exit_code == 2 and "optional extra 'tracking'" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
