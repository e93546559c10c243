"""Run a sweep: every configuration and seed, federated and its baselines, audited, into tidy tables.

One task is a setup at one privacy level with one seed. It runs the federation
on the chosen engine (its run directory under ``runs/``), trains the baselines
on the same records (``simulations.baselines``), and scores every model on the
same held-out records, with the loss-threshold membership attack
(``common.audit``) on members (the institutions' training records) against
non-members (their held-out records). Tasks are independent, so the in-process
engine spreads them over worker processes.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from client.institution import InstitutionData
from client.simulated_data import simulated_partition
from common.audit import loss_threshold_auc, record_losses
from common.datasets import load_dataset
from common.errors import ConfigError
from common.models import build_model, set_weights
from simulations.baselines import alone, federation_members, pooled, records_digest
from simulations.engines import run_engine
from simulations.sweep_spec import SweepSpec, Task

METHODS = ("federated", "pooled", "alone")


@dataclass
class TaskResult:
    """The tidy rows one task produced."""

    results: list[dict[str, Any]] = field(default_factory=list)
    institutions: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def check_sweep(spec: SweepSpec) -> None:
    """Fail before anything runs if a dataset, partition or federation size cannot work."""
    dataset = load_dataset(spec.dataset, str(spec.settings.get("schema-path", "")))
    _, labels = dataset.schema.transform(dataset.frame, source=dataset.name)
    for setup in spec.setups:
        if setup.secure_aggregation and setup.institutions < 3:
            raise ConfigError(
                f"SecAgg+ needs at least 3 institutions. Found institutions {setup.institutions} with "
                "secure-aggregation true; add institutions or set secure-aggregation to false"
            )
        for seed in spec.seeds:
            task = Task(setup, spec.levels[-1], seed)
            simulated_partition(spec.run_settings(task), dataset.frame, labels, setup.institutions)


def _predictions(model: nn.Module, inputs: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(inputs, dtype=torch.float32)), dim=1).numpy()


def assess(models: list[nn.Module], members: list[InstitutionData]) -> tuple[dict[str, float], list[float]]:
    """Metrics on the union of the held-out records, each scored by its institution's model.

    Returns the overall metrics (accuracy, loss, AUC for two classes, attack AUC)
    and each institution's accuracy.
    """
    probs = [_predictions(m, d.test_x) for m, d in zip(models, members, strict=True)]
    labels = np.concatenate([d.test_y for d in members])
    scores = np.concatenate(probs)
    per_institution = [float((p.argmax(1) == d.test_y).mean()) for p, d in zip(probs, members, strict=True)]
    picked = np.clip(scores[np.arange(len(labels)), labels], 1e-12, 1.0)
    metrics = {"accuracy": float((scores.argmax(1) == labels).mean()), "loss": float(-np.log(picked).mean())}
    if scores.shape[1] == 2 and len(np.unique(labels)) == 2:
        metrics["auc"] = float(roc_auc_score(labels, scores[:, 1]))
    pairs = list(zip(models, members, strict=True))
    member_losses = np.concatenate([record_losses(m, d.train_x, d.train_y) for m, d in pairs])
    held_losses = np.concatenate([record_losses(m, d.test_x, d.test_y) for m, d in pairs])
    metrics["attack_auc"] = loss_threshold_auc(member_losses, held_losses)
    return metrics, per_institution


def run_task(spec: SweepSpec, task: Task, out_dir: str) -> TaskResult:
    """Run one task: the federation and its baselines, scored and audited."""
    torch.set_num_threads(1)
    settings = spec.run_settings(task)
    n = task.setup.institutions
    members = federation_members(settings, n)
    schema = members[0].schema
    base = {
        "run_id": task.run_id,
        "dataset": spec.dataset,
        "institutions": n,
        "partition": task.setup.partition,
        "secure_aggregation": task.setup.secure_aggregation,
        "local_epochs": task.setup.local_epochs,
        "rounds": spec.rounds,
        "level": task.level.label,
        "private": task.level.private,
        "target_epsilon": task.level.target_epsilon,
        "noise_multiplier": task.level.noise_multiplier,
        "delta": spec.delta,
        "seed": task.seed,
        "train_records": sum(len(m.train_y) for m in members),
        "test_records": sum(len(m.test_y) for m in members),
        "train_digest": records_digest(
            np.concatenate([m.train_x for m in members]), np.concatenate([m.train_y for m in members])
        ),
        "test_digest": records_digest(
            np.concatenate([m.test_x for m in members]), np.concatenate([m.test_y for m in members])
        ),
    }
    out = TaskResult()

    def book(method: str, models: list[nn.Module], epsilon: float, started: float) -> None:
        metrics, per_institution = assess(models, members)
        wall = time.monotonic() - started
        out.results.append({**base, "method": method, "epsilon": epsilon, **metrics, "wall_s": round(wall, 3)})
        for member, accuracy in zip(members, per_institution, strict=True):
            out.institutions.append(
                {
                    **{k: base[k] for k in ("run_id", "level", "target_epsilon", "noise_multiplier", "seed")},
                    "method": method,
                    "institution": member.name,
                    "train_records": len(member.train_y),
                    "test_records": len(member.test_y),
                    "accuracy": accuracy,
                }
            )

    started = time.monotonic()
    run_dir = Path(out_dir) / "runs" / task.run_id
    report = run_engine(spec.engine, settings.with_overrides({"out-dir": str(run_dir)}), institutions=n)
    model = build_model(settings.train, schema, seed=settings.seed)
    set_weights(model, [t.numpy() for t in torch.load(run_dir / "model.pt").values()])
    book("federated", [model] * n, float(report["max_epsilon"]), started)
    for row in report["rounds"]:
        out.rounds.append(
            {
                **{k: base[k] for k in ("run_id", "level", "target_epsilon", "noise_multiplier", "seed")},
                "round": row["round"],
                "accuracy": row["accuracy"],
                "max_epsilon": float(row["max_epsilon"]),
            }
        )

    started = time.monotonic()
    trained = pooled(members, settings)
    book("pooled", [trained.model] * n, trained.epsilon, started)

    started = time.monotonic()
    alones = [alone(m, settings, i) for i, m in enumerate(members)]
    book("alone", [a.model for a in alones], max(a.epsilon for a in alones), started)
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_sweep(
    spec: SweepSpec, out_dir: Path, *, jobs: int, on_done: Callable[[Task], None] | None = None
) -> dict[str, pd.DataFrame]:
    """Run every task (``jobs`` processes for the in-process engine); return the tidy tables."""
    tasks = spec.tasks()
    results: list[TaskResult | None] = [None] * len(tasks)
    if jobs > 1 and spec.engine == "inprocess" and len(tasks) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(run_task, spec, task, str(out_dir)): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(tasks[i])
    else:
        for i, task in enumerate(tasks):
            results[i] = run_task(spec, task, str(out_dir))
            if on_done is not None:
                on_done(task)
    done = [r for r in results if r is not None]
    tables = {
        "results": pd.DataFrame([row for r in done for row in r.results]),
        "institutions": pd.DataFrame([row for r in done for row in r.institutions]),
        "rounds": pd.DataFrame([row for r in done for row in r.rounds]),
    }
    return tables


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (mean and spread over seeds) per privacy level and method, side by side."""
    keys = ["institutions", "partition", "secure_aggregation", "local_epochs", "level", "target_epsilon"]
    keys += ["noise_multiplier", "method"]
    grouped = results.groupby(keys, dropna=False, sort=False)
    table = grouped.agg(
        accuracy_mean=("accuracy", "mean"),
        accuracy_std=("accuracy", "std"),
        epsilon=("epsilon", "max"),
        attack_auc=("attack_auc", "mean"),
        seeds=("seed", "nunique"),
    ).reset_index()
    table["accuracy_std"] = table["accuracy_std"].fillna(0.0)
    return table


def format_level(target_epsilon: float, noise_multiplier: float) -> str:
    if noise_multiplier > 0:
        return f"sigma {noise_multiplier:g}"
    return "inf (no DP)" if math.isinf(target_epsilon) else f"{target_epsilon:g}"
