"""Turn the benchmarks' JSON files into one Markdown table, each figure beside its target.

python -m fedsilo.simulations.benchmarks.table bench > bench/RESULTS.md
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Any


def _rows(name: str, data: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if name == "dp_overhead":
        for result in data["results"]:
            target = "<= 1.3x"
            for mode in ("hooks", "functorch", "ew", "ghost"):
                entry = result[mode]
                figure = f"{entry['ratio']:.2f}x" if "ratio" in entry else f"fails: {entry['error'][:60]}"
                rows.append((f"DP-SGD overhead, {result['model']}, {mode}", figure, target))
    elif name.startswith("secagg_overhead"):
        for result in data["results"]:
            n = result["institutions"]
            target = "<= 1.2x" if n <= 10 else "<= 1.5x" if n >= 100 else "-"
            figure = (
                f"{result['ratio']:.2f}x ({result['plain']['steady_s']:.1f} s -> {result['secagg']['steady_s']:.1f} s)"
            )
            shares = result.get("num_shares", 1.0)
            graph = "every institution a neighbour" if shares == 1.0 else f"secagg-num-shares {shares:g}"
            rows.append((f"SecAgg+ overhead per round, {n} institutions ({graph})", figure, target))
    elif name == "scale":
        what = (
            f"Scale: {data['institutions']:,} institutions, {data['sampled_per_round']} sampled per round, "
            f"SecAgg+ (secagg-num-shares {data['secagg']['num_shares']:g}), {data['dataset']}, "
            f"{data.get('fraction_evaluate', 1.0):.0%} evaluating"
        )
        steady = f"{data['steady_s']:.1f} s per round (first round {data['first_round_s']:.1f} s)"
        rows.append((what + ": seconds per round", steady, "<= 20 s"))
        memory = f"{data['peak_pss_gb']:.2f} GB PSS ({data['peak_rss_gb']:.2f} GB RSS summed)"
        rows.append((what + ": peak memory, whole process tree", memory, "<= 4 GB"))
    elif name == "deployment_latency":
        figure = f"{data['median_seconds_per_round']:.1f} s per round"
        if "cold" in data:
            figure += f" (a cold process per message: {data['cold']['median_seconds_per_round']:.1f} s)"
        rows.append((f"Deployment round, {data['institutions']} institutions, TLS + SecAgg+", figure, "<= 10 s"))
    elif name == "institution_size":
        for r in data["results"]:
            if "round_s" not in r:
                rows.append((f"One institution's round, {r['records']:,} records", "did not finish", "-"))
                continue
            train = r["dp_train"]
            figure = (
                f"{r['round_s']:.1f} s ({r['dominant']} dominates: training {train['seconds']:.1f} s, "
                f"{r['plan_account']['steps']} steps), peak {r['peak_rss_mb'] / 1024:.2f} GB RSS"
            )
            rows.append((f"One institution's round, {r['records']:,} records, default settings", figure, "-"))
    elif name == "utility":
        rows += _utility_rows(data)
    elif name == "sweep":
        rows.append((data["benchmark"], f"{data['wall_s']:.1f} s", "< 60 s"))
    elif name == "ray_sweep":
        figure = f"{data['ray_wall_s']:.1f} s on Ray vs {data['local_wall_s']:.1f} s locally"
        figure += f" ({data['ratio_ray_to_local']:.2f}x, {data['nodes_used']} nodes, "
        figure += f"same results: {data['same_results']})"
        rows.append((data["benchmark"], figure, "-"))
        startup = f"cluster up {data['cluster_start_s']:.1f} s; import ray {data['import_ray_s']:.1f} s; "
        startup += f"join as a driver {data['join_and_leave_s']:.1f} s"
        rows.append(("Ray start-up: a head and a worker (ray start), a sweep's driver joining", startup, "-"))
    elif name == "fashion_mnist":
        rows += _fashion_mnist_rows(data)
    return rows


def _utility_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Lead metric per dataset and epsilon: federated, pooled, alone and reference, and the majority rate."""
    rows: list[tuple[str, str, str]] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    majority: dict[str, float] = {}
    for r in data["rows"]:
        eps = "no DP" if r["epsilon"] == "inf" else f"eps {r['epsilon']:g}"
        cells.setdefault((r["dataset"], eps), {})[r["method"]] = f"{r['mean']:.3f}"
        cells[(r["dataset"], eps)]["metric"] = r["metric"].upper() if r["metric"] == "auc" else r["metric"]
        majority[r["dataset"]] = r["majority_rate"]
    for (dataset, eps), c in cells.items():
        figure = " / ".join(c.get(m, "-") for m in ("federated", "pooled", "alone", "reference"))
        what = f"Utility, {dataset}, {eps}: {c['metric']} federated / pooled / alone / reference"
        rows.append((what, figure, f"majority rate {majority[dataset]:.3f}"))
    for t in data.get("targets", []):
        rows.append((f"Utility target: {t['target']}", t["figure"], "met" if t["met"] else "MISSED"))
    return rows


def _fashion_mnist_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Test accuracy per partition, epsilon and activation; the target and the literature beside them."""
    rows: list[tuple[str, str, str]] = []
    n = data["institutions"]
    for r in data["results"]:
        what = f"Fashion-MNIST, {n} institutions {r['partition']}, CNN {r['activation']}, eps {r['target_epsilon']:g}"
        figure = f"{100 * r['test_accuracy']:.1f}% (eps {r['epsilon_spent']:.2f}, {r['wall_s'] / 60:.1f} min)"
        target = "-"
        if r["partition"] == "iid" and r["target_epsilon"] == 3:
            target = ">= 84% (central: 86.1%)" if r["activation"] == "tanh" else "- (central: 81.9%)"
        rows.append((what, figure, target))
    runs = len(data["results"])
    rows.append((f"Fashion-MNIST benchmark, {runs} federations", f"{data['wall_s'] / 60:.0f} min", "< 60 min"))
    return rows


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "bench")
    rows: list[tuple[str, str, str]] = []
    machines: set[str] = set()
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        spec = data.get("machine", {})
        machines.add(f"{spec.get('cpus', '?')} CPUs, {spec.get('platform', '?')}")
        rows += _rows(path.stem, data)
    print(
        f"Tabulated {date.today().isoformat()} from {folder}/*.json, measured on {'; '.join(sorted(machines))} "
        "(each file records its machine and the load average while it ran).\n"
    )
    print("| benchmark | figure | target |\n|---|---|---|")
    for what, figure, target in rows:
        print(f"| {what} | {figure} | {target} |")


if __name__ == "__main__":
    main()
