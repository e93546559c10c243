"""Distributed DP against pooled and local DP-SGD: utility, epsilon and time, and the price of Skellam accounting.

For each dataset (German credit and breast cancer by default), with ``--institutions``
iid institutions (4), at a target epsilon (2, delta 1e-5), on the in-process engine,
every model is scored on the institutions' held-out records as a federated run scores
it (``report["final_metrics"]``: each institution's accuracy and ROC AUC, weighted by its
held-out records; the same scores on the union of those records are in the JSON):

- ``pooled``: central DP-SGD on the union of the institutions' training records with the
  default recipe at the same epsilon (``fedsilo.simulations.baselines.pooled``): what
  pooling the data would give, and the ceiling distributed DP aims at;
- ``local``: ``dp-mode = "local"``, every setting at its default (8 rounds): each
  institution adds the full noise to its own update;
- ``distributed``: ``dp-mode = "distributed"``, one aggregated DP-SGD step a round, with
  as many rounds as the pooled recipe's steps (``--rounds`` to choose) and the default
  sample rate (``sample-rate = 0``: ``fedsilo.common.settings.distributed_sample_rate``),
  evaluated once at the end, SecAgg+'s reconstruction threshold 1.0 (no dropout allowed)
  and each institution's policy (``simulation-policy``) counting on ``min-honest`` = all
  the institutions (the shares sum to exactly the central noise), half of them, and 1
  (each adds the full noise itself). ``--sample-rates`` sweeps given sample rates
  ("default" is the default's), keeping sample rate x rounds (the epochs) the pooled
  recipe's, with min-honest = all the institutions after the first (``--min-honest``
  chooses); a rate needing more than ``--train-max-rounds`` rounds is accounted but not
  trained (a run's bookkeeping grows with the rounds already done, so its time grows
  about as rounds squared);
- ``distributed, Gaussian-equivalent noise``: a diagnostic, not a private configuration:
  the first distributed configuration with the noise fixed at what the Gaussian (PLD)
  needs for the target at its sample rate and rounds (policy max-epsilon 100), to show
  what the Skellam accounting's extra noise costs; its epsilon is what the Skellam
  accountant charges for that noise.

For every distributed configuration it also prints the noise multiplier the Skellam
accountant needs for the target (``fedsilo.common.aggregation.plan_distributed``: RDP of
Agarwal et al. Cor. 3.6 under the binomial Poisson-subsampling bound of
``fedsilo.common.accounting.subsampled_rdp``) beside the Gaussian noise the PLD accountant
needs for the same sample rate, steps and epsilon
(``fedsilo.common.accounting.calibrate_noise``), their ratio, and the epsilon the Skellam
accountant charges for the Gaussian's noise: the price of sound accounting for the Skellam
mechanism, 1.08-1.11x at every sample rate (the RDP-to-(epsilon, delta) conversion and the
rounding's 3%).

A benchmark: it prints figures and writes JSON; it never fails on an accuracy or a time.
Runs are seeded (``--seeds``); one federation runs at a time, on one torch thread. It also
prints (and writes as ``summary``) each configuration's mean, standard deviation and range
over the seeds, and its mean gap to pooled. A dataset may be a CSV or Parquet file, with
``--schema-path`` naming its schema.

    python -m fedsilo.simulations.benchmarks.distributed_dp --seeds 42,43,44 --out bench/distributed_dp.json
    python -m fedsilo.simulations.benchmarks.distributed_dp --datasets german-credit \\
        --sample-rates 0.0625,0.03125,0.02,0.01,0.005 --min-honest 4 --skip-local \\
        --skip-gaussian-equivalent --train-max-rounds 800 --out bench/distributed_dp_sample_rates.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsilo.client.institution import InstitutionData
from fedsilo.common.accounting import calibrate_noise, epsilon_spent, skellam_event
from fedsilo.common.aggregation import plan_distributed
from fedsilo.common.metrics import classification_metrics
from fedsilo.common.models import build_model
from fedsilo.common.settings import RunSettings
from fedsilo.common.training import RoundPlan, evaluate, plan_round, predict_proba
from fedsilo.simulations.baselines import federation_members, pooled
from fedsilo.simulations.benchmarks import emit, machine
from fedsilo.simulations.inprocess import run_inprocess
from fedsilo.simulations.runner import simulated

SCORES = ("accuracy", "auc")
DEFAULT = "default"  # in --sample-rates: the settings' default rate (sample-rate = 0)
DEFAULT_METHOD = "distributed, default sample rate"
GAUSSIAN_EQUIVALENT = "distributed, Gaussian-equivalent noise"
DIAGNOSTIC_MAX_EPSILON = 100.0  # the diagnostic row's policy budget: its noise is not calibrated to the target


def base_settings(args: argparse.Namespace, dataset: str, seed: int, out_dir: str) -> RunSettings:
    """The run's settings before any method's own: the dataset, the target and the seed, the rest defaults."""
    return RunSettings().with_overrides(
        {
            "dataset": dataset,
            "partition": "iid",
            "target-epsilon": args.epsilon,
            "delta": args.delta,
            "seed": seed,
            "out-dir": out_dir,
            "schema-path": getattr(args, "schema_path", ""),
        }
    )


def weighted_scores(model: torch.nn.Module, members: list[InstitutionData]) -> dict[str, float]:
    """Each institution's scores on its held-out records, weighted by their count (as ``final_metrics``)."""
    per = [(len(m.test_y), evaluate(model, m.test_x, m.test_y)) for m in members]
    out = {}
    for key in SCORES:
        reporting = [(n, s[key]) for n, s in per if key in s]
        total = sum(n for n, _ in reporting)
        if total:
            out[key] = sum(n * v for n, v in reporting) / total
    return out


def union_scores(model: torch.nn.Module, members: list[InstitutionData]) -> dict[str, float]:
    """The same scores on the union of the held-out records (one AUC over all of them)."""
    x = np.concatenate([m.test_x for m in members])
    y = np.concatenate([m.test_y for m in members])
    metrics = classification_metrics(y, predict_proba(model, x))
    return {k: float(metrics[k]) for k in SCORES if k in metrics}


def pooled_recipe(settings: RunSettings, members: list[InstitutionData]) -> RoundPlan:
    """The default recipe's round on the union (as ``fedsilo.simulations.baselines.train_centrally`` plans it)."""
    records = sum(len(m.train_y) for m in members)
    return plan_round(
        num_examples=records, train=settings.train, privacy=settings.privacy, planned_rounds=settings.rounds
    )


def run_pooled(settings: RunSettings, members: list[InstitutionData]) -> dict[str, Any]:
    """Central DP-SGD on the union with the default recipe, scored on the institutions' held-out records."""
    plan = pooled_recipe(settings, members)
    started = time.monotonic()
    trained = pooled(members, settings)
    seconds = time.monotonic() - started
    return {
        "method": "pooled",
        "min_honest": None,
        "sample_rate": plan.sample_rate,
        "rounds": settings.rounds,
        "steps": trained.steps,
        "noise_multiplier": plan.noise_multiplier,
        "epsilon_spent": trained.epsilon,
        **weighted_scores(trained.model, members),
        "union": union_scores(trained.model, members),
        "seconds": seconds,
        "seconds_per_round": seconds / settings.rounds,
        "seconds_per_step": seconds / max(1, trained.steps),
    }


def run_federated(
    method: str,
    settings: RunSettings,
    members: list[InstitutionData],
    *,
    min_honest: int | None = None,
) -> dict[str, Any]:
    """One federation on the in-process engine; its final model scored as the pooled one is."""
    with tempfile.TemporaryDirectory(prefix="fedsilo-ddp-bench-") as scratch:
        # A fresh run directory, its institutions' ledgers in it: no run spends another's budget.
        run = settings.with_overrides({"out-dir": str(Path(scratch) / "run"), "state-root": ""})
        if min_honest is not None:
            budget = DIAGNOSTIC_MAX_EPSILON if method == GAUSSIAN_EQUIVALENT else settings.privacy.target_epsilon
            policy = Path(scratch) / "policy.toml"
            policy.write_text(f"max-epsilon = {budget!r}\nmin-honest = {min_honest}\n", encoding="utf-8")
            run = run.with_overrides({"simulation-policy": str(policy)})
        started = time.monotonic()
        report = run_inprocess(run, institutions=len(members))
        wall = time.monotonic() - started
        model = build_model(run.train, members[0].schema, seed=run.seed)
        model.load_state_dict(torch.load(Path(run.out_dir) / "model.pt"))
    elapsed = [float(r["elapsed_s"]) for r in report["rounds"]]
    per_round = np.diff([0.0, *elapsed])
    tenth = max(1, len(per_round) // 10)
    ledger = max((i["ledger"] for i in report["institutions"]), key=len)  # empty only if every round was refused
    final = report["final_metrics"]
    refused = sum(len(i.get("refusals", [])) for i in report["institutions"])
    rounds = report["rounds_completed"]
    return {
        "method": method,
        "min_honest": min_honest,
        "sample_rate": ledger[0]["sample_rate"] if ledger else None,
        "rounds": rounds,
        "steps": sum(e["steps"] for e in ledger),
        "noise_multiplier": ledger[0]["noise_multiplier"] if ledger else None,
        "epsilon_spent": report["max_epsilon"],
        **{k: final[k] for k in SCORES if k in final},
        "union": union_scores(model, members),
        "refusals": refused,
        "seconds": wall,
        "seconds_per_round": report["elapsed_s"] / max(1, rounds),
        "rounds_s": report["elapsed_s"],
        # Each round's seconds grow with the rounds done before it (the run's bookkeeping): the mean over
        # the first and the last tenth of the rounds.
        "seconds_per_round_first_tenth": float(np.mean(per_round[:tenth])),
        "seconds_per_round_last_tenth": float(np.mean(per_round[-tenth:])),
    }


def noise_comparison(settings: RunSettings, members: list[InstitutionData]) -> dict[str, Any]:
    """The Skellam accountant's noise for a distributed run beside the Gaussian (PLD) noise for the same q and steps."""
    model = build_model(settings.train, members[0].schema, seed=settings.seed)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = plan_distributed(settings, dim)
    gaussian = calibrate_noise(
        target_epsilon=settings.privacy.target_epsilon,
        delta=settings.privacy.delta,
        sample_rate=plan.sample_rate,
        steps=settings.rounds,
    )
    at_gaussian = skellam_event(
        noise_multiplier=gaussian,
        sample_rate=plan.sample_rate,
        steps=settings.rounds,
        scale=plan.scale,
        max_grad_norm=plan.max_grad_norm,
        dim_padded=plan.dim_padded,
    )
    return {
        "sample_rate": plan.sample_rate,
        "rounds": settings.rounds,
        "dim": dim,
        "dim_padded": plan.dim_padded,
        "scale": plan.scale,
        "skellam_noise_multiplier": plan.noise_multiplier,
        "gaussian_pld_noise_multiplier": gaussian,
        "ratio": plan.noise_multiplier / gaussian,
        # What the Skellam accountant charges for the Gaussian's noise (the PLD charges the target for it).
        "skellam_epsilon_at_gaussian_noise": epsilon_spent([at_gaussian], delta=settings.privacy.delta),
    }


def honest_counts(institutions: int) -> list[int]:
    """min-honest values: all the institutions, half of them, and 1 (each once)."""
    return sorted({institutions, max(1, institutions // 2), 1}, reverse=True)


def dataset_rows(args: argparse.Namespace, dataset: str, seed: int, scratch: Path) -> dict[str, Any]:
    """Every method on one dataset with one seed."""
    n = args.institutions
    settings = simulated(base_settings(args, dataset, seed, str(scratch / "members")), n)
    members = federation_members(settings, n)
    recipe = pooled_recipe(settings, members)
    epochs = recipe.sample_rate * recipe.planned_steps  # passes over the union, the pooled recipe's
    print(
        f"{dataset}, seed {seed}: {sum(len(m.train_y) for m in members)} training records in {n} institutions; "
        f"pooled recipe q {recipe.sample_rate:.4g}, {recipe.planned_steps} steps ({epochs:g} epochs), "
        f"noise {recipe.noise_multiplier:.3f}",
        flush=True,
    )
    rows = [run_pooled(settings, members)]
    _progress(rows[-1])
    if not args.skip_local:
        rows.append(run_federated("local", settings, members))
        _progress(rows[-1])
    rates = [0.0 if q == DEFAULT else float(q) for q in args.sample_rates.split(",")]
    noise = []
    for q in rates:
        # The default rate (0) runs the pooled recipe's steps (or --rounds) as rounds; a given rate, its epochs.
        rounds = (args.rounds or recipe.planned_steps) if q == 0 else max(1, round(epochs / q))
        distributed = settings.with_overrides(
            {
                "dp-mode": "distributed",
                "num-server-rounds": rounds,
                "sample-rate": q,
                "eval-every": rounds,
                "secagg-reconstruction-threshold": args.reconstruction_threshold,
            }
        )
        comparison = noise_comparison(distributed, members)
        noise.append(comparison)
        rate, label = comparison["sample_rate"], " (default)" if q == 0 else ""
        print(
            f"  q {rate:.4g}{label}, {rounds} rounds: Skellam noise {comparison['skellam_noise_multiplier']:.3f}, "
            f"Gaussian (PLD) {comparison['gaussian_pld_noise_multiplier']:.3f}, ratio {comparison['ratio']:.2f}; "
            f"Skellam epsilon at the Gaussian noise {comparison['skellam_epsilon_at_gaussian_noise']:.3f}",
            flush=True,
        )
        if rounds > args.train_max_rounds:
            print(f"  q {rate:.4g}: {rounds} rounds is above --train-max-rounds; accounted, not trained", flush=True)
            continue
        honest = [int(h) for h in args.min_honest.split(",")] if args.min_honest else None
        if honest is None:
            honest = honest_counts(n) if q == rates[0] else [n]
        method = DEFAULT_METHOD if q == 0 else "distributed"
        for h in honest:
            rows.append(run_federated(method, distributed, members, min_honest=h))
            _progress(rows[-1])
        if q == rates[0] and not args.skip_gaussian_equivalent:
            fixed = distributed.with_overrides({"noise-multiplier": comparison["gaussian_pld_noise_multiplier"]})
            rows.append(run_federated(GAUSSIAN_EQUIVALENT, fixed, members, min_honest=n))
            _progress(rows[-1])
    for row in rows:
        row.update(dataset=dataset, seed=seed)
    return {
        "dataset": dataset,
        "seed": seed,
        "train_records": [len(m.train_y) for m in members],
        "heldout_records": [len(m.test_y) for m in members],
        "pooled_recipe": {
            "sample_rate": recipe.sample_rate,
            "steps": recipe.planned_steps,
            "epochs": epochs,
            "batch_size": recipe.batch_size,
            "noise_multiplier": recipe.noise_multiplier,
        },
        "noise": noise,
        "rows": rows,
    }


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each configuration's scores and seconds over the seeds: mean, standard deviation, range, and gap to pooled.

    A configuration is a dataset, method, min-honest, sample rate and rounds; its gap to pooled
    is the mean over seeds of its score minus the same seed's pooled score (paired).
    """
    pooled = {(r["dataset"], r["seed"]): r for res in results for r in res["rows"] if r["method"] == "pooled"}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for res in results:
        for r in res["rows"]:
            groups.setdefault((r["dataset"], r["method"], r["min_honest"], r["sample_rate"], r["rounds"]), []).append(r)
    out = []
    for (dataset, method, honest, rate, rounds), rows in groups.items():
        entry: dict[str, Any] = {
            "dataset": dataset,
            "method": method,
            "min_honest": honest,
            "sample_rate": rate,
            "rounds": rounds,
            "seeds": [r["seed"] for r in rows],
        }
        for key in (*SCORES, "seconds"):
            values = np.array([r[key] for r in rows if key in r], dtype=float)
            if not values.size:
                continue
            entry[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
                "per_seed": values.tolist(),
            }
            if key in SCORES:
                paired = [(r[key], pooled.get((dataset, r["seed"]), {}).get(key)) for r in rows if key in r]
                gaps = [ours - theirs for ours, theirs in paired if theirs is not None]
                if gaps:
                    entry[f"{key}_gap_to_pooled"] = {"mean": float(np.mean(gaps)), "min": min(gaps), "max": max(gaps)}
        out.append(entry)
    return out


def _summary_line(e: dict[str, Any]) -> str:
    def stat(key: str) -> str:
        if key not in e:
            return f"{'-':>30}"
        v = e[key]
        return f"{v['mean']:.3f} +-{v['std']:.3f} [{v['min']:.3f},{v['max']:.3f}]".rjust(30)

    def gap(key: str) -> str:
        g = e.get(f"{key}_gap_to_pooled")
        return f"{'-':>8}" if g is None else f"{g['mean']:>+8.3f}"

    return (
        f"{e['dataset'][:14]:<15}{e['method']:<40}{_cell(e['min_honest'], 'd', 4)}{_cell(e['sample_rate'], '.4f', 8)}"
        f"{e['rounds']:>7d}{stat('accuracy')}{gap('accuracy')}{stat('auc')}{gap('auc')}"
        f"{e['seconds']['mean']:>8.1f}"
    )


def _progress(row: dict[str, Any]) -> None:
    print(f"  done: {_line(row)}", flush=True)


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


HEADER = (
    f"{'method':<40}{'min-honest':>11}{'q':>8}{'rounds':>7}{'noise':>8}{'eps spent':>10}"
    f"{'accuracy':>9}{'AUC':>7}{'s/round':>9}{'total s':>9}"
)


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['method']:<40}{_cell(r['min_honest'], 'd', 11)}{_cell(r['sample_rate'], '.4f', 8)}{r['rounds']:>7d}"
        f"{_cell(r['noise_multiplier'], '.3f', 8)}{r['epsilon_spent']:>10.3f}{_cell(r.get('accuracy'), '.3f', 9)}"
        f"{_cell(r.get('auc'), '.3f', 7)}{r['seconds_per_round']:>9.3f}{r['seconds']:>9.1f}"
        + (f"  ({r['refusals']} refusals)" if r.get("refusals") else "")
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``: None for ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="german-credit,breast-cancer", help="Built-ins or CSV/Parquet files.")
    parser.add_argument("--institutions", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seeds", default="42", help="Comma-separated run seeds (42: the settings' default).")
    parser.add_argument(
        "--sample-rates",
        default=DEFAULT,
        help="Distributed sample rates, comma-separated: 'default' (sample-rate = 0, the settings' rule, over "
        "--rounds rounds) or a rate q (over pooled epochs / q rounds).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="Rounds of a distributed run at the default sample rate (0: the pooled recipe's steps).",
    )
    parser.add_argument("--schema-path", default="", help="The schema of a CSV/Parquet dataset.")
    parser.add_argument(
        "--min-honest",
        default="",
        help="Comma-separated min-honest values run at every sample rate ('': the institutions, half of them "
        "and 1 at the first sample rate, the institutions alone at the others).",
    )
    parser.add_argument(
        "--train-max-rounds",
        type=int,
        default=1000,
        help="A sample rate needing more distributed rounds is accounted (its noise printed) but not trained: "
        "the run's bookkeeping grows with the rounds done, so a run's time grows about as rounds squared.",
    )
    parser.add_argument("--reconstruction-threshold", type=float, default=1.0, help="secagg-reconstruction-threshold")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-gaussian-equivalent", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="Keep every round's log line.")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)  # the engine logs every round; thousands here
    torch.set_num_threads(1)  # as every simulated institution trains, and one core for whoever shares the machine
    at_start = machine()
    print(f"on {at_start}", flush=True)
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-ddp-bench-") as scratch:
        for dataset in args.datasets.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                results.append(dataset_rows(args, dataset, seed, Path(scratch) / f"{dataset}-{seed}"))
    wall = time.monotonic() - started
    for result in results:
        print(f"\n{result['dataset']}, seed {result['seed']}, target epsilon {args.epsilon:g} (delta {args.delta:g})")
        print(HEADER)
        for row in result["rows"]:
            print(_line(row))
        print(
            f"{'q':>8}{'rounds':>7}{'Skellam noise':>15}{'Gaussian PLD':>14}{'ratio':>7}{'Skellam eps, PLD noise':>24}"
        )
        for c in result["noise"]:
            print(
                f"{c['sample_rate']:>8.4f}{c['rounds']:>7d}{c['skellam_noise_multiplier']:>15.3f}"
                f"{c['gaussian_pld_noise_multiplier']:>14.3f}{c['ratio']:>7.2f}"
                f"{c['skellam_epsilon_at_gaussian_noise']:>24.3f}"
            )
    summary = summarize(results)
    print(f"\nover seeds {args.seeds}: mean +-sd [min,max]; gap: mean paired difference to pooled")
    print(
        f"{'dataset':<15}{'method':<40}{'h':>4}{'q':>8}{'rounds':>7}{'accuracy':>30}{'gap':>8}{'AUC':>30}{'gap':>8}"
        f"{'s/run':>8}"
    )
    for entry in summary:
        print(_summary_line(entry))
    print(f"\ntotal wall time {wall:.0f} s")
    emit(
        {
            "benchmark": "Distributed DP (Skellam in SecAgg+) against pooled and local DP-SGD",
            "institutions": args.institutions,
            "target_epsilon": args.epsilon,
            "delta": args.delta,
            "seeds": [int(s) for s in args.seeds.split(",")],
            "reconstruction_threshold": args.reconstruction_threshold,
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "scores": "accuracy and auc: each institution's held-out records, weighted by their count "
            "(report final_metrics); 'union': the same on the union of the held-out records",
            "results": results,
            "summary": summary,
            "wall_s": wall,
            "machine": machine(load_average_1m_at_start=at_start["load_average_1m"]),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
