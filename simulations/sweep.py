"""Run a sweep: every configuration and seed, federated and its baselines, audited, into tidy tables.

One task is a setup at one privacy level with one seed. It runs the federation
on the chosen engine (its run directory under ``runs/``), trains the baselines
on the same records (``fedsilo.simulations.baselines``; the non-private ``reference``
once per setup and seed, in the no-DP task), and scores every model on the
same held-out records (``fedsilo.common.metrics``), with the loss-threshold membership
attack (``fedsilo.common.audit``) on members (the institutions' training records)
against non-members (their held-out records). Tasks are independent, so the
in-process engine spreads them over worker processes, or a Ray cluster runs
them (``fedsilo.simulations.cluster``); each finished task is stored as it arrives
(``fedsilo.simulations.sweep_store``), so an interrupted sweep resumes where it stopped.

Refusals are part of the result: every row carries its federation's
institution-rounds trained and refused, and its ``status``: ``ok``,
``refusals`` (some institution refused some round: a warning) or
``untrained`` (no round was ever aggregated, so the federated "model" is the
initial one: an error; its numbers are kept in results.csv but left out of
every average, table cell and plot).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedsilo.client.institution import InstitutionData
from fedsilo.client.simulated_data import simulated_partition
from fedsilo.common.audit import loss_threshold_auc
from fedsilo.common.datasets import load_dataset
from fedsilo.common.metrics import PROBABILITY_FLOOR, classification_metrics, lead_metric
from fedsilo.common.models import build_model, set_weights
from fedsilo.common.training import predict_proba
from fedsilo.simulations.baselines import alone, federation_members, pooled, records_digest, reference
from fedsilo.simulations.engines import run_engine
from fedsilo.simulations.plan import check_secagg_quorum
from fedsilo.simulations.sweep_spec import SweepSpec, Task
from fedsilo.simulations.sweep_store import SweepStore, TaskRecord

METHODS = ("federated", "pooled", "alone", "reference")
SCORES = ("auc", "average_precision", "balanced_accuracy", "accuracy")
REFUSAL_COLUMNS = ("rounds_aggregated", "institution_rounds_trained", "institution_rounds_refused")
STATUS_OK, STATUS_REFUSALS, STATUS_UNTRAINED = "ok", "refusals", "untrained"
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass
class TaskResult:
    """The tidy rows one task produced."""

    results: list[dict[str, Any]] = field(default_factory=list)
    institutions: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def check_sweep(spec: SweepSpec) -> None:
    """Fail before anything runs if a dataset, partition or federation size cannot work."""
    dataset = load_dataset(spec.dataset, spec.schema)
    _, labels = dataset.schema.transform(dataset.frame, source=dataset.name)
    for setup in spec.setups:
        check_secagg_quorum(
            setup.institutions, setup.secure_aggregation, fix="add institutions or set secure-aggregation to false"
        )
        for seed in spec.seeds:
            task = Task(setup, spec.levels[-1], seed)
            simulated_partition(spec.run_settings(task), dataset.frame, labels, setup.institutions)


def _record_losses(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each record's cross-entropy (the attack's score), from predicted probabilities."""
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], PROBABILITY_FLOOR, 1.0))


def assess(predictors: list[Predict], members: list[InstitutionData]) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Metrics on the union of the held-out records, each scored by its institution's model.

    ``predictors[i]`` gives institution ``i``'s model's class probabilities. Returns the
    overall metrics (``fedsilo.common.metrics.classification_metrics``, the mean training loss
    on the union of the training records, the attack AUC and the digest of the records
    scored) and each institution's metrics on its own held-out records.
    """
    pairs = list(zip(predictors, members, strict=True))
    probs = [predict(d.test_x) for predict, d in pairs]
    labels = np.concatenate([d.test_y for d in members])
    metrics: dict[str, Any] = classification_metrics(labels, np.concatenate(probs))
    per_institution = [classification_metrics(d.test_y, p) for p, d in zip(probs, members, strict=True)]
    member_losses = np.concatenate([_record_losses(predict(d.train_x), d.train_y) for predict, d in pairs])
    held_losses = np.concatenate([_record_losses(p, d.test_y) for p, d in zip(probs, members, strict=True)])
    metrics["train_loss"] = float(member_losses.mean())
    metrics["attack_auc"] = loss_threshold_auc(member_losses, held_losses)
    metrics["test_digest"] = records_digest(np.concatenate([d.test_x for d in members]), labels)
    return metrics, per_institution


def refusals(report: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """How much of a federation trained: rounds aggregated, institution-rounds trained and refused, status.

    A round is aggregated when the run directory holds its checkpoint (with SecAgg+ a
    round with fewer than two trainers halts unaggregated). None aggregated: the final
    model is the initial one (``untrained``).
    """
    rows = report["rounds"]
    counts = {
        "rounds_aggregated": len(list((run_dir / "checkpoints").glob("round-*.pt"))),
        "institution_rounds_trained": sum(int(r["institutions_trained"]) for r in rows),
        "institution_rounds_refused": sum(int(r["institutions_refused"]) for r in rows),
    }
    if counts["rounds_aggregated"] == 0:
        status = STATUS_UNTRAINED
    elif counts["institution_rounds_refused"] > 0:
        status = STATUS_REFUSALS
    else:
        status = STATUS_OK
    return {**counts, "status": status}


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
        "num_classes": schema.num_classes,
        "institutions": n,
        "partition": task.setup.partition,
        "secure_aggregation": task.setup.secure_aggregation,
        "local_epochs": task.setup.local_epochs,
        "dp_mode": task.setup.dp_mode,
        "rounds": spec.rounds,
        "level": task.level.label,
        "private": task.level.private,
        "target_epsilon": task.level.target_epsilon,
        "noise_multiplier": task.level.noise_multiplier,
        "delta": spec.delta,
        "seed": task.seed,
        "train_records": sum(len(m.train_y) for m in members),
        "test_records": sum(len(m.test_y) for m in members),
    }
    out = TaskResult()
    keys = ("run_id", "level", "target_epsilon", "noise_multiplier", "seed")

    def book(
        method: str, predictors: list[Predict], epsilon: float, train_digest: str, started: float, **extra: Any
    ) -> None:
        metrics, per_institution = assess(predictors, members)
        wall = time.monotonic() - started
        row = {**base, "method": method, "epsilon": epsilon, **metrics, "train_digest": train_digest, **extra}
        out.results.append({**row, "wall_s": round(wall, 3)})
        for member, scores in zip(members, per_institution, strict=True):
            out.institutions.append(
                {
                    **{k: base[k] for k in keys},
                    "method": method,
                    "institution": member.name,
                    "train_records": len(member.train_y),
                    "test_records": len(member.test_y),
                    **{k: v for k, v in scores.items() if k != "loss"},
                    "status": extra["status"],
                }
            )

    started = time.monotonic()
    run_dir = Path(out_dir) / "runs" / task.run_id
    report = run_engine(spec.engine, replace(settings, out_dir=str(run_dir)), institutions=n)
    federation = refusals(report, run_dir)
    model = build_model(settings.train, schema, seed=settings.seed)
    set_weights(model, [t.numpy() for t in torch.load(run_dir / "model.pt").values()])
    pooled_digest = records_digest(
        np.concatenate([m.train_x for m in members]), np.concatenate([m.train_y for m in members])
    )
    baseline = {k: 0 for k in REFUSAL_COLUMNS} | {"status": STATUS_OK, "baseline_rounds": math.nan, "converged": True}
    book(
        "federated",
        [lambda x: predict_proba(model, x)] * n,
        float(report["max_epsilon"]),
        pooled_digest,
        started,
        **federation,
        baseline_rounds=math.nan,
        converged=True,
    )
    for row in report["rounds"]:
        out.rounds.append(
            {
                **{k: base[k] for k in keys},
                "round": row["round"],
                **{k: row.get(k) for k in (*SCORES, "loss")},
                "max_epsilon": float(row["max_epsilon"]),
                "institutions_trained": int(row["institutions_trained"]),
                "institutions_refused": int(row["institutions_refused"]),
                "status": federation["status"],
            }
        )

    started = time.monotonic()
    trained = pooled(members, settings)
    book(
        "pooled",
        [trained.predict_proba] * n,
        trained.epsilon,
        trained.train_digest,
        started,
        **{**baseline, "baseline_rounds": trained.rounds, "converged": trained.converged},
    )

    started = time.monotonic()
    alones = [alone(m, settings, i) for i, m in enumerate(members)]
    book(
        "alone",
        [a.predict_proba for a in alones],
        max(a.epsilon for a in alones),
        pooled_digest,  # each institution's own training records, in institution order
        started,
        **{**baseline, "baseline_rounds": max(a.rounds for a in alones), "converged": all(a.converged for a in alones)},
    )

    if not task.level.private:  # the reference is non-private: once per setup and seed
        started = time.monotonic()
        fitted = reference(members)
        book(
            "reference",
            [fitted.predict_proba] * n,
            math.inf,
            fitted.train_digest,
            started,
            **{**baseline, "converged": fitted.converged},
        )
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def ran_here() -> dict[str, Any]:
    """Where a task ran: this host and process (a Ray task adds its node id)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def run_recorded(spec: SweepSpec, task: Task, out_dir: str) -> TaskRecord:
    """Run one task (``run_task``) and record where and how long it ran."""
    started = time.monotonic()
    result = run_task(spec, task, out_dir)
    ran_on = {**ran_here(), "wall_s": round(time.monotonic() - started, 3)}
    return TaskRecord(task.run_id, result.results, result.institutions, result.rounds, ran_on)


Arrived = Callable[[Task, TaskRecord], None]
Failed = Callable[[Task, BaseException], None]


def _run_local(spec: SweepSpec, tasks: list[Task], out_dir: Path, jobs: int, arrived: Arrived, failed: Failed) -> None:
    """Run ``tasks`` here: in ``jobs`` worker processes (in-process engine), or one after another."""
    if jobs > 1 and spec.engine == "inprocess" and len(tasks) > 1:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init)
        try:
            futures = {pool.submit(run_recorded, spec, task, str(out_dir)): task for task in tasks}
            for future in as_completed(futures):
                try:
                    record = future.result()
                except Exception as err:
                    failed(futures[future], err)
                else:
                    arrived(futures[future], record)
        finally:  # interrupted: start nothing more (what is running finishes; its result is not kept)
            pool.shutdown(wait=False, cancel_futures=True)
        return
    for task in tasks:
        try:
            record = run_recorded(spec, task, str(out_dir))
        except Exception as err:
            failed(task, err)
        else:
            arrived(task, record)


def run_sweep(
    spec: SweepSpec,
    out_dir: Path,
    *,
    jobs: int,
    on_done: Callable[[Task], None] | None = None,
    on_record: Arrived | None = None,
) -> dict[str, pd.DataFrame]:
    """Run every task not finished yet; return the tidy tables of all finished ones, and the failures.

    Tasks run locally (``jobs`` processes for the in-process engine) or, when
    ``spec.ray_address`` is set, as Ray tasks on that cluster (``fedsilo.simulations.cluster``).
    Each finished task is stored under ``out_dir/tasks`` as it arrives
    (``fedsilo.simulations.sweep_store``), so a sweep started again with the same ``out_dir``
    reruns only the tasks that had not finished. A task that raises is stored under
    ``out_dir/failures`` and does not stop the others. ``on_done`` is called once per
    task run now, finished or failed; ``on_record`` with each task finished now and its
    record (experiment tracking). The tables: ``results``, ``institutions``,
    ``rounds`` (in the spec's task order), ``failures`` (run_id, error, details) and
    ``tasks`` (where each finished task ran: host, pid, Ray node id, wall time).
    """
    store = SweepStore.open(out_dir, spec)
    tasks = spec.tasks()
    done = store.finished()
    todo = [task for task in tasks if task.run_id not in done]
    for task in todo:  # a task cut short left a partial run directory (and ledgers): start it afresh
        shutil.rmtree(Path(out_dir) / "runs" / task.run_id, ignore_errors=True)

    def arrived(task: Task, record: TaskRecord) -> None:
        store.save(task, record)
        done[task.run_id] = record
        if on_record is not None:
            on_record(task, record)
        if on_done is not None:
            on_done(task)

    def failed(task: Task, err: BaseException) -> None:
        details = "".join(traceback.format_exception(err))
        store.fail(task, f"{type(err).__name__}: {err}", details)
        if on_done is not None:
            on_done(task)

    if spec.ray_address:
        from fedsilo.simulations.cluster import run_on_ray

        run_on_ray(spec, todo, Path(out_dir), arrived, failed)
    else:
        _run_local(spec, todo, Path(out_dir), jobs, arrived, failed)
    records = [done[task.run_id] for task in tasks if task.run_id in done]
    failures = store.failures()
    wanted = {task.run_id for task in tasks} - set(done)
    if len(failures):
        failures = failures[failures["run_id"].isin(wanted)].reset_index(drop=True)
    return {
        "results": pd.DataFrame([row for r in records for row in r.results]),
        "institutions": pd.DataFrame([row for r in records for row in r.institutions]),
        "rounds": pd.DataFrame([row for r in records for row in r.rounds]),
        "failures": failures,
        "tasks": pd.DataFrame([{"run_id": r.run_id, **r.ran_on} for r in records]),
    }


SUMMARY_KEYS = ["institutions", "partition", "secure_aggregation", "local_epochs", "dp_mode", "level"]
SUMMARY_KEYS += ["target_epsilon"]
SUMMARY_KEYS += ["noise_multiplier", "method"]


def sweep_lead_metric(results: pd.DataFrame) -> str:
    """The score a sweep's tables and plots lead with (``fedsilo.common.metrics.lead_metric``)."""
    return lead_metric(int(results["num_classes"].iloc[0]), float(results["majority_rate"].mean()))


def counted(results: pd.DataFrame) -> pd.DataFrame:
    """The rows whose numbers are a trained model's: every row but an untrained federation's."""
    return results[results["status"] != STATUS_UNTRAINED]


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, privacy level and method: every score's mean and spread over seeds, refusals, status.

    Untrained federations are left out of the means (``seeds`` counts the seeds
    averaged, ``seeds_untrained`` those left out); ``status`` is the worst over seeds:
    ``untrained``, then ``refusals``, then ``ok``. ``majority_rate`` is the share of
    the most common class among the held-out records: the accuracy of always
    guessing it.
    """
    lead = sweep_lead_metric(results)
    scores = [s for s in (lead, *SCORES, "loss", "train_loss") if s in results.columns]
    scores = list(dict.fromkeys(scores))  # the lead metric first
    aggregations: dict[str, tuple[str, Any]] = {}
    for score in scores:
        aggregations[f"{score}_mean"] = (score, "mean")
        aggregations[f"{score}_std"] = (score, "std")
    aggregations |= {"attack_auc": ("attack_auc", "mean"), "seeds": ("seed", "nunique")}
    grouped = counted(results).groupby(SUMMARY_KEYS, dropna=False, sort=False).agg(**aggregations)
    totals = results.groupby(SUMMARY_KEYS, dropna=False, sort=False).agg(
        majority_rate=("majority_rate", "mean"),
        epsilon=("epsilon", "max"),
        **{c: (c, "sum") for c in REFUSAL_COLUMNS},
        seeds_untrained=("status", lambda s: int((s == STATUS_UNTRAINED).sum())),
        status=("status", _worst_status),
    )
    table = totals.join(grouped, how="left").reset_index()
    table["seeds"] = table["seeds"].fillna(0).astype(int)
    for score in scores:
        table[f"{score}_std"] = table[f"{score}_std"].where(table["seeds"] != 1, 0.0)
    first = [*SUMMARY_KEYS, *[c for s in scores for c in (f"{s}_mean", f"{s}_std")], "majority_rate"]
    return table[first + [c for c in table.columns if c not in first]]


def _worst_status(statuses: pd.Series) -> str:
    for status in (STATUS_UNTRAINED, STATUS_REFUSALS):
        if (statuses == status).any():
            return status
    return STATUS_OK


def format_level(target_epsilon: float, noise_multiplier: float) -> str:
    if noise_multiplier > 0:
        return f"sigma {noise_multiplier:g}"
    return "inf (no DP)" if math.isinf(target_epsilon) else f"{target_epsilon:g}"


def setup_title(n: int, partition: str, secure_aggregation: bool, local_epochs: int, dp_mode: str = "local") -> str:
    """A setup in words."""
    secagg = "SecAgg+" if secure_aggregation else "plain FedAvg"
    if dp_mode == "distributed":
        return f"{n} institutions, {partition}, {secagg}, distributed DP (one step a round)"
    return f"{n} institutions, {partition}, {secagg}, {local_epochs} local epochs"


def status_messages(results: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Warnings (federations in which some institution refused) and errors (federations never trained).

    One message per federated run, naming its setup, privacy level and seed.
    """
    warned: list[str] = []
    errors: list[str] = []
    federated = results[results["method"] == "federated"]
    for row in federated.itertuples(index=False):
        where = (
            f"{setup_title(row.institutions, row.partition, row.secure_aggregation, row.local_epochs, row.dp_mode)}, "
            f"epsilon {format_level(row.target_epsilon, row.noise_multiplier)}, seed {row.seed}"
        )
        trained, refused = int(row.institution_rounds_trained), int(row.institution_rounds_refused)
        asked = trained + refused
        if row.status == STATUS_UNTRAINED:
            errors.append(
                f"{where}: no round was aggregated ({refused} of {asked} institution-rounds refused"
                + (", and SecAgg+ unmasks no round with a single trainer" if trained and row.secure_aggregation else "")
                + "), so the federated model is the untrained initial one; it is left out of the tables, "
                "averages and plots (results.csv keeps it, status 'untrained'). Check the institutions' "
                "policies and budgets (runs/" + row.run_id + "/report.json, refusals)"
            )
        elif row.status == STATUS_REFUSALS:
            warned.append(
                f"{where}: {refused} of {asked} institution-rounds refused ({int(row.rounds_aggregated)} of "
                f"{int(row.rounds)} rounds aggregated); the federated model learned from fewer records than its "
                "baselines (runs/" + row.run_id + "/report.json, refusals)"
            )
    return warned, errors
