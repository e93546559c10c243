"""The in-process engine trains the model the run settings choose: the CNN on (synthetic) Fashion-MNIST files."""

from __future__ import annotations

import csv
import gzip
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsilo.common import datasets
from fedsilo.common.errors import ConfigError
from fedsilo.common.models import SmallCNN, build_model
from fedsilo.common.schema import Schema
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import evaluate
from fedsilo.simulations import inprocess
from fedsilo.simulations.baselines import federation_members
from fedsilo.simulations.inprocess import run_inprocess


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Debian's IDX files: big-endian header, then the bytes."""
    count = len(labels)
    header = (2051).to_bytes(4, "big") + count.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    label_header = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_header + labels.tobytes()))


@pytest.fixture
def fashion_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """72 training images of two classes (bright top half, bright bottom half) and 8 test images."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, count in (("train", 72), ("t10k", 8)):
        labels = (np.arange(count) % 2).astype(np.uint8)
        images = rng.integers(0, 60, size=(count, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 14 * label : 14 * label + 14] += 180
        write_idx(folder, prefix, images, labels)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", folder)
    return folder


def test_a_cnn_federation_trains_with_dp_and_reports_its_model(fashion_files: Path, tmp_path: Path) -> None:
    # Prepare
    settings = RunSettings().with_overrides(
        {
            "dataset": "fashion-mnist-train",
            "model": "cnn",
            "activation": "tanh",
            "num-server-rounds": 2,
            "local-epochs": 1,
            "batch-size": 8,
            "learning-rate": 0.5,
            "target-epsilon": 3.0,
            "max-grad-norm": 0.1,
            "out-dir": str(tmp_path / "run"),
        }
    )
    # Execute
    report = run_inprocess(settings, institutions=3)
    # Assert
    assert report["rounds_completed"] == 2
    assert report["settings"]["model"] == "cnn" and report["settings"]["activation"] == "tanh"
    assert {k: report["model"][k] for k in ("kind", "activation", "num_inputs")} == {
        "kind": "cnn",
        "activation": "tanh",
        "num_inputs": 784,
    }
    assert all(0 < i["epsilon"] <= 3.0 + 1e-6 and len(i["ledger"]) == 2 for i in report["institutions"])
    assert 0.0 <= report["final_metrics"]["accuracy"] <= 1.0
    model = build_model(settings.train, Schema.load(datasets.builtin_schema_path("fashion-mnist")), seed=0)
    model.load_state_dict(torch.load(tmp_path / "run" / "model.pt"))
    assert isinstance(model, SmallCNN)


def test_a_cnn_on_a_tabular_schema_is_refused_before_anything_runs(tmp_path: Path) -> None:
    settings = RunSettings().with_overrides({"model": "cnn", "out-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="28x28 grayscale image"):
        run_inprocess(settings, institutions=3)
    assert not (tmp_path / "run" / "report.json").exists()


def test_every_round_row_holds_the_record_weighted_mean_of_the_institutions_held_out_scores(tmp_path: Path) -> None:
    # Prepare
    settings = RunSettings().with_overrides(
        {"num-server-rounds": 2, "target-epsilon": 4.0, "seed": 3, "out-dir": str(tmp_path / "run")}
    )
    # Execute
    report = run_inprocess(settings, institutions=3)
    # Assert: each round's scores are recomputed from its checkpoint on every institution's held-out records
    members = federation_members(settings, 3)
    schema = Schema.load(datasets.builtin_schema_path("breast-cancer"))
    with (tmp_path / "run" / "metrics.csv").open() as fh:
        csv_rows = list(csv.DictReader(fh))
    for row, csv_row in zip(report["rounds"], csv_rows, strict=True):
        model = build_model(settings.train, schema, seed=settings.seed)
        model.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / f"round-{row['round']:04d}.pt"))
        scores = [(evaluate(model, m.test_x, m.test_y), len(m.test_y)) for m in members]
        for key in ("auc", "average_precision", "balanced_accuracy", "accuracy", "loss"):
            expected = sum(s[key] * n for s, n in scores) / sum(n for _, n in scores)
            assert row[key] == pytest.approx(expected, abs=1e-9)
            assert float(csv_row[key]) == pytest.approx(expected, abs=1e-9)
    assert set(report["final_metrics"]) == {"auc", "average_precision", "balanced_accuracy", "accuracy", "loss"}
    assert "majority_rate" not in csv_rows[0]  # the institutions' class balance stays with them


@pytest.mark.parametrize("secure", [False, True])
def test_one_institutions_malformed_reply_is_dropped_and_the_run_still_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secure: bool
) -> None:
    # Prepare: the first institution's every trained reply loses its noise multiplier and claims delta 1
    settings = RunSettings().with_overrides(
        {"num-server-rounds": 2, "secure-aggregation": secure, "out-dir": str(tmp_path / "run")}
    )
    victim = sorted(m.name for m in federation_members(settings, 3))[0]
    honest_fit_round = inprocess.fit_round

    def corrupted(data: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = honest_fit_round(data, *args, **kwargs)
        if data.name == victim and "refused" not in outcome.metrics:
            metrics = {k: v for k, v in outcome.metrics.items() if k != "noise-multiplier"}
            return replace(outcome, metrics={**metrics, "delta": 1.0})
        return outcome

    monkeypatch.setattr(inprocess, "fit_round", corrupted)
    # Execute
    report = run_inprocess(settings, institutions=3)
    # Assert: the run ends with its report; the victim's replies are listed as rejected, never booked
    assert (tmp_path / "run" / "report.json").exists() and report["rounds_planned"] == 2
    by_name = {i["name"]: i for i in report["institutions"]}
    assert by_name[victim]["ledger"] == [] and by_name[victim]["delta"] == 0.0
    reasons = [r["reason"] for r in by_name[victim]["rejected"]]
    assert reasons and all("'noise-multiplier' is missing" in r and "'delta' must be" in r for r in reasons)
    others = [i for n, i in by_name.items() if n != victim]
    assert all(i["rejected"] == [] for i in others)
    # without SecAgg+ the others' updates are aggregated; under it, a round with the victim's masked update is void
    if secure:
        assert report["rounds_completed"] == 0
    else:
        assert report["rounds_completed"] == 2
