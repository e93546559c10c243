"""A sweep's outputs: tidy tables (CSV and Parquet), plots, and one self-contained report.html.

Plots (matplotlib, Agg): accuracy against epsilon per method with the spread
over seeds and each method's non-private line; federated accuracy over rounds
per privacy level; each institution's accuracy, federated against alone; and
the membership attack's AUC against epsilon.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from simulations.sweep import METHODS, format_level, summary_table

COLORS = {"federated": "#1f77b4", "pooled": "#2ca02c", "alone": "#d62728"}
LABELS = {"federated": "federated (fedsilo)", "pooled": "pooled data", "alone": "each institution alone"}
SETUP_KEYS = ["institutions", "partition", "secure_aggregation", "local_epochs"]


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """results.csv/.parquet (one row per configuration, seed and method), institutions.csv, rounds.csv."""
    results = tables["results"]
    results.to_csv(out_dir / "results.csv", index=False)
    results.to_parquet(out_dir / "results.parquet", index=False)
    tables["institutions"].to_csv(out_dir / "institutions.csv", index=False)
    tables["rounds"].to_csv(out_dir / "rounds.csv", index=False)
    summary_table(results).to_csv(out_dir / "summary.csv", index=False)


def _x(frame: pd.DataFrame) -> pd.Series:
    """The epsilon axis: the target epsilon, else (fixed noise) the epsilon the federation spent."""
    return frame["target_epsilon"].where(frame["noise_multiplier"] <= 0, frame["epsilon"])


def _setups(results: pd.DataFrame) -> list[tuple[Any, pd.DataFrame]]:
    return list(results.groupby(SETUP_KEYS, sort=False))


def _setup_title(key: tuple[Any, ...]) -> str:
    n, partition, secagg, epochs = key
    return f"{n} institutions, {partition}, {'SecAgg+' if secagg else 'plain FedAvg'}, {epochs} local epochs"


def _epsilon_axis(ax: Any, values: Any) -> None:
    """A log epsilon axis ticked at the swept values, written plainly."""
    ticks = sorted({float(v) for v in values if np.isfinite(v)})
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("epsilon per institution (log scale)")


def _panels(count: int, title: str) -> tuple[Any, list[Any]]:
    fig, axes = plt.subplots(1, count, figsize=(6.4 * count, 4.4), squeeze=False)
    fig.suptitle(title)
    return fig, list(axes[0])


def plot_accuracy_vs_epsilon(results: pd.DataFrame, path: Path, metric: str = "accuracy") -> None:
    """Mean over seeds with a min-max band, one curve per method; dashed: the method without DP."""
    setups = _setups(results)
    what = "Accuracy" if metric == "accuracy" else "Membership attack AUC"
    fig, axes = _panels(len(setups), f"{what} against epsilon (band: min to max over seeds)")
    for ax, (key, frame) in zip(axes, setups, strict=True):
        frame = frame.assign(x=_x(frame))
        for method in METHODS:
            rows = frame[frame["method"] == method]
            private = rows[np.isfinite(rows["x"])]
            stats = private.groupby("x")[metric].agg(["mean", "min", "max"]).sort_index()
            if not stats.empty:
                ax.plot(stats.index, stats["mean"], "o-", color=COLORS[method], label=LABELS[method])
                ax.fill_between(stats.index, stats["min"], stats["max"], color=COLORS[method], alpha=0.18)
            no_dp = rows[~rows["private"]][metric]
            if not no_dp.empty:
                ax.axhline(no_dp.mean(), color=COLORS[method], linestyle="--", linewidth=1.2, label=f"{method}, no DP")
        if metric == "attack_auc":
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="coin toss (0.5)")
        _epsilon_axis(ax, frame["x"])
        ax.set_ylabel("membership attack AUC" if metric == "attack_auc" else "accuracy on the held-out records")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(rounds: pd.DataFrame, results: pd.DataFrame, path: Path) -> None:
    """Federated accuracy after every round, one line per privacy level (mean over seeds, min-max band)."""
    meta = results[results["method"] == "federated"][["run_id", *SETUP_KEYS]].drop_duplicates()
    frame = rounds.merge(meta, on="run_id")
    setups = list(frame.groupby(SETUP_KEYS, sort=False))
    fig, axes = _panels(len(setups), "Federated accuracy over rounds, per privacy level")
    levels = sorted(frame[["target_epsilon", "noise_multiplier"]].drop_duplicates().itertuples(index=False))
    cmap = plt.get_cmap("viridis", max(len(levels), 2))
    for ax, (key, part) in zip(axes, setups, strict=True):
        for i, (eps, sigma) in enumerate(levels):
            rows = part[(part["target_epsilon"] == eps) & (part["noise_multiplier"] == sigma)]
            stats = rows.groupby("round")["accuracy"].agg(["mean", "min", "max"])
            label = f"epsilon {format_level(eps, sigma)}"
            style = "--" if math.isinf(eps) and sigma <= 0 else "-"
            ax.plot(stats.index, stats["mean"], style, color=cmap(i), label=label)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=cmap(i), alpha=0.12)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy on the held-out records")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_institutions(institutions: pd.DataFrame, results: pd.DataFrame, path: Path) -> None:
    """Each institution's accuracy against epsilon: the federated model (solid) against its own model (dashed)."""
    meta = results[results["method"] == "federated"][["run_id", *SETUP_KEYS, "epsilon"]].drop_duplicates()
    frame = institutions.merge(meta.drop(columns="epsilon"), on="run_id")
    setups = list(frame.groupby(SETUP_KEYS, sort=False))
    fig, axes = _panels(len(setups), "Per-institution accuracy: federated model (solid) vs. trained alone (dashed)")
    for ax, (key, part) in zip(axes, setups, strict=True):
        part = part.assign(x=part["target_epsilon"].where(part["noise_multiplier"] <= 0, np.nan))
        names = sorted(part["institution"].unique())
        cmap = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            records = int(part[part["institution"] == name]["train_records"].mean())
            for method, style in (("federated", "o-"), ("alone", "s--")):
                rows = part[(part["institution"] == name) & (part["method"] == method) & np.isfinite(part["x"])]
                stats = rows.groupby("x")["accuracy"].mean().sort_index()
                label = f"{name} ({records} training records)" if method == "federated" else None
                ax.plot(stats.index, stats.values, style, color=cmap(i % 10), label=label, alpha=0.85)
        _epsilon_axis(ax, part["x"])
        ax.set_ylabel("accuracy on the institution's held-out records")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", title="solid: federated, dashed: alone", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tradeoff_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows: setup and privacy level; columns: each method's accuracy (mean ± std over seeds), epsilon, attack AUC."""
    summary = summary_table(results)
    summary["cell"] = summary.apply(lambda r: f"{r.accuracy_mean:.3f} ± {r.accuracy_std:.3f}", axis=1)
    keys = [*SETUP_KEYS, "target_epsilon", "noise_multiplier"]
    wide = summary.pivot_table(index=keys, columns="method", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in METHODS if m in wide.columns]]
    federated = summary[summary["method"] == "federated"].set_index(keys)
    wide["epsilon spent (federated)"] = federated["epsilon"].map(lambda e: "inf" if math.isinf(e) else f"{e:.3f}")
    wide["attack AUC (federated)"] = federated["attack_auc"].map(lambda a: f"{a:.3f}")
    wide = wide.reset_index()
    wide.insert(
        len(SETUP_KEYS),
        "epsilon",
        [format_level(e, s) for e, s in zip(wide.pop("target_epsilon"), wide.pop("noise_multiplier"), strict=True)],
    )
    return wide.rename(columns={m: f"{m} accuracy" for m in METHODS})


def write_report(tables: dict[str, pd.DataFrame], out_dir: Path, *, title: str, notes: list[str]) -> list[Path]:
    """Write the plots and report.html (plots embedded) and report.md; return the plot paths."""
    results = tables["results"]
    plots = {
        "accuracy_vs_epsilon.png": lambda p: plot_accuracy_vs_epsilon(results, p),
        "accuracy_over_rounds.png": lambda p: plot_rounds(tables["rounds"], results, p),
        "per_institution_accuracy.png": lambda p: plot_institutions(tables["institutions"], results, p),
        "attack_auc_vs_epsilon.png": lambda p: plot_accuracy_vs_epsilon(results, p, metric="attack_auc"),
    }
    paths = []
    for name, draw in plots.items():
        draw(out_dir / name)
        paths.append(out_dir / name)
    table = tradeoff_table(results)
    images = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>"
        for p in paths
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{notes_html}</ul>
<h2>Privacy / accuracy trade-off</h2>
<p>Accuracy on the institutions' held-out records (mean ± standard deviation over seeds). Every method uses the
same records: <em>federated</em> is fedsilo (DP-SGD at every institution, aggregated), <em>pooled</em> trains one
model on all institutions' training records, <em>alone</em> gives every institution a model of its own data only.
Epsilon is per institution (pooled: for the pooled data) at the same delta; the attack AUC is the loss-threshold
membership-inference attack on the final federated model (0.5: no better than a coin toss).</p>
{table.to_html(index=False, escape=True)}
<h2>Plots</h2>
{images}
<p>Tables: results.csv / results.parquet (one row per configuration, seed and method), institutions.csv,
rounds.csv, summary.csv; every federated run's directory is under runs/.</p>
</body></html>
"""
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    markdown = [f"# {title}", "", *[f"- {n}" for n in notes], "", markdown_table(table), ""]
    markdown += [f"![{p.stem}]({p.name})" for p in paths]
    (out_dir / "report.md").write_text("\n".join(markdown) + "\n", encoding="utf-8")
    return paths


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
