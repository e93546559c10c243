"""A sweep's outputs: tidy tables (CSV and Parquet), plots, and one self-contained report.html.

Everything leads with the sweep's lead metric (``fedsilo.simulations.sweep.sweep_lead_metric``:
ROC AUC for two classes; for more, accuracy, or balanced accuracy when one class
dominates), and every plot draws what a model that ignores its inputs would score
on it (for accuracy: the majority-class rate), so no score can flatter. Plots
(matplotlib, Agg): the lead metric against epsilon per method with the spread over
seeds, each method's non-private line and the logistic-regression reference (for
a binary task also accuracy against epsilon, with the majority-class rate); the
federated lead metric over rounds per privacy level; each institution's, federated
against alone; and the membership attack's AUC against epsilon. A federation that
never trained is left out of every plot and average, and named in the report.
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

from fedsilo.common.metrics import LABELS as METRIC_LABELS
from fedsilo.simulations.sweep import (
    METHODS,
    STATUS_UNTRAINED,
    counted,
    format_level,
    setup_title,
    status_messages,
    summary_table,
    sweep_lead_metric,
)

COLORS = {"federated": "#1f77b4", "pooled": "#2ca02c", "alone": "#d62728", "reference": "#9467bd"}
LABELS = {
    "federated": "federated (fedsilo)",
    "pooled": "pooled data",
    "alone": "each institution alone",
    "reference": "logistic regression, pooled, no DP",
}
SETUP_KEYS = ["institutions", "partition", "secure_aggregation", "local_epochs", "dp_mode"]
CURVES = ("federated", "pooled", "alone")  # drawn against epsilon; the reference is a horizontal line


def write_tables(tables: dict[str, pd.DataFrame], out_dir: Path) -> None:
    """results.csv/.parquet (one row per configuration, seed and method), institutions.csv, rounds.csv, summary.csv.

    And tasks.csv (where each task ran: host, pid, Ray node id, wall time), and failures.csv (one
    row per failed task: run_id, error, details) when a task failed.
    """
    results = tables["results"]
    results.to_csv(out_dir / "results.csv", index=False)
    results.to_parquet(out_dir / "results.parquet", index=False)
    tables["institutions"].to_csv(out_dir / "institutions.csv", index=False)
    tables["rounds"].to_csv(out_dir / "rounds.csv", index=False)
    summary_table(results).to_csv(out_dir / "summary.csv", index=False)
    if "tasks" in tables:
        tables["tasks"].to_csv(out_dir / "tasks.csv", index=False)
    failures = tables.get("failures")
    if failures is not None and len(failures):
        failures.to_csv(out_dir / "failures.csv", index=False)
    else:
        (out_dir / "failures.csv").unlink(missing_ok=True)


def chance_level(metric: str, results: pd.DataFrame) -> tuple[float, str]:
    """What a model that ignores its inputs scores on ``metric`` here, and its name in a legend."""
    k = int(results["num_classes"].iloc[0])
    if metric == "accuracy":
        return float(results["majority_rate"].mean()), "majority-class rate (always guess the commonest class)"
    if metric == "balanced_accuracy":
        return 1.0 / k, f"constant model (1/{k})"
    if metric == "average_precision":
        return float(results["positive_rate"].mean()), "random model (the positive rate)"
    return 0.5, "random or constant model (0.5)" if metric == "auc" else "coin toss (0.5)"


def _name(metric: str) -> str:
    return "membership attack AUC" if metric == "attack_auc" else METRIC_LABELS[metric]


def _x(frame: pd.DataFrame) -> pd.Series:
    """The epsilon axis: the target epsilon, else (fixed noise) the epsilon the federation spent."""
    return frame["target_epsilon"].where(frame["noise_multiplier"] <= 0, frame["epsilon"])


def _setups(results: pd.DataFrame) -> list[tuple[Any, pd.DataFrame]]:
    return list(results.groupby(SETUP_KEYS, sort=False))


def _setup_title(key: tuple[Any, ...]) -> str:
    return setup_title(*key)


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


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_vs_epsilon(results: pd.DataFrame, path: Path, metric: str) -> None:
    """Mean over seeds with a min-max band, one curve per method; dashed: the method without DP.

    The reference (logistic regression, no DP) is a dash-dot line in its own colour;
    the grey dotted line is what a model that ignores its inputs scores.
    """
    setups = _setups(counted(results))
    what = _name(metric)
    fig, axes = _panels(len(setups), f"{what[0].upper()}{what[1:]} against epsilon (band: min to max over seeds)")
    for ax, (key, frame) in zip(axes, setups, strict=True):
        frame = frame.assign(x=_x(frame))
        for method in CURVES:
            rows = frame[frame["method"] == method]
            private = rows[np.isfinite(rows["x"])]
            stats = private.groupby("x")[metric].agg(["mean", "min", "max"]).sort_index()
            if not stats.empty:
                ax.plot(stats.index, stats["mean"], "o-", color=COLORS[method], label=LABELS[method])
                ax.fill_between(stats.index, stats["min"], stats["max"], color=COLORS[method], alpha=0.18)
            no_dp = rows[~rows["private"]][metric]
            if not no_dp.empty:
                ax.axhline(no_dp.mean(), color=COLORS[method], linestyle="--", linewidth=1.2, label=f"{method}, no DP")
        if metric != "attack_auc":
            ref = frame[frame["method"] == "reference"][metric]
            if not ref.empty:
                ax.axhline(
                    ref.mean(), color=COLORS["reference"], linestyle="-.", linewidth=1.4, label=LABELS["reference"]
                )
        level, label = chance_level(metric, frame)
        ax.axhline(level, color="grey", linestyle=":", linewidth=1.2, label=f"{label}: {level:.3f}")
        _epsilon_axis(ax, frame["x"])
        ax.set_ylabel(what if metric == "attack_auc" else f"{what} on the held-out records")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    _save(fig, path)


def plot_rounds(rounds: pd.DataFrame, results: pd.DataFrame, path: Path, metric: str) -> None:
    """The federated metric after every round, one line per privacy level (mean over seeds, min-max band).

    Each round's value is the record-weighted mean of the institutions' own scores on
    their held-out records (what the coordinator logs); untrained federations are left out.
    """
    meta = results[results["method"] == "federated"][["run_id", *SETUP_KEYS]].drop_duplicates()
    frame = rounds[rounds["status"] != STATUS_UNTRAINED].merge(meta, on="run_id")
    setups = list(frame.groupby(SETUP_KEYS, sort=False))
    what = _name(metric)
    fig, axes = _panels(max(len(setups), 1), f"Federated {what} over rounds, per privacy level")
    levels = sorted(frame[["target_epsilon", "noise_multiplier"]].drop_duplicates().itertuples(index=False))
    cmap = plt.get_cmap("viridis", max(len(levels), 2))
    for ax, (key, part) in zip(axes, setups, strict=False):
        for i, (eps, sigma) in enumerate(levels):
            rows = part[(part["target_epsilon"] == eps) & (part["noise_multiplier"] == sigma)]
            stats = rows.groupby("round")[metric].agg(["mean", "min", "max"])
            label = f"epsilon {format_level(eps, sigma)}"
            style = "--" if math.isinf(eps) and sigma <= 0 else "-"
            ax.plot(stats.index, stats["mean"], style, color=cmap(i), label=label)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=cmap(i), alpha=0.12)
        level, name = chance_level(metric, results)
        ax.axhline(level, color="grey", linestyle=":", linewidth=1.2, label=f"{name}: {level:.3f}")
        ax.set_xlabel("round")
        ax.set_ylabel(f"{what} (record-weighted mean over institutions)")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    _save(fig, path)


def plot_institutions(institutions: pd.DataFrame, results: pd.DataFrame, path: Path, metric: str) -> None:
    """Each institution's metric against epsilon: the federated model (solid) against its own model (dashed)."""
    meta = results[results["method"] == "federated"][["run_id", *SETUP_KEYS]].drop_duplicates()
    frame = institutions[institutions["status"] != STATUS_UNTRAINED].merge(meta, on="run_id")
    setups = list(frame.groupby(SETUP_KEYS, sort=False))
    what = _name(metric)
    title = f"Per-institution {what}: federated model (solid) vs. trained alone (dashed)"
    fig, axes = _panels(max(len(setups), 1), title)
    for ax, (key, part) in zip(axes, setups, strict=False):
        part = part.assign(x=part["target_epsilon"].where(part["noise_multiplier"] <= 0, np.nan))
        names = sorted(part["institution"].unique())
        cmap = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            records = int(part[part["institution"] == name]["train_records"].mean())
            for method, style in (("federated", "o-"), ("alone", "s--")):
                rows = part[(part["institution"] == name) & (part["method"] == method) & np.isfinite(part["x"])]
                stats = rows.groupby("x")[metric].mean().sort_index() if metric in rows else pd.Series()
                label = f"{name} ({records} training records)" if method == "federated" else None
                ax.plot(stats.index, stats.values, style, color=cmap(i % 10), label=label, alpha=0.85)
        level, name = chance_level(metric, results)
        ax.axhline(level, color="grey", linestyle=":", linewidth=1.2, label=f"{name}: {level:.3f}")
        _epsilon_axis(ax, part["x"])
        ax.set_ylabel(f"{what} on the institution's held-out records")
        ax.set_title(_setup_title(key), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", title="solid: federated, dashed: alone", title_fontsize=8)
    _save(fig, path)


def lead_explanation(results: pd.DataFrame, metric: str) -> str:
    """Why the tables and plots lead with ``metric``, in a sentence."""
    k = int(results["num_classes"].iloc[0])
    majority = float(results["majority_rate"].mean())
    if metric == "auc":
        return (
            f"Shown: ROC AUC. Two classes, the majority class {majority:.1%} of the held-out records: always "
            f"guessing it scores accuracy {majority:.3f} but AUC 0.5 (and balanced accuracy 0.5), so AUC cannot "
            "flatter a model that ignores its inputs."
        )
    if metric == "balanced_accuracy":
        return (
            f"Shown: balanced accuracy (mean recall over the classes). {k} classes, the majority class holds "
            f"{majority:.1%} of the held-out records (at least twice its fair share {1 / k:.1%}), so accuracy "
            f"would flatter; a constant model scores {1 / k:.3f}."
        )
    return (
        f"Shown: accuracy. {k} classes, roughly balanced: the majority class holds {majority:.1%} of the held-out "
        "records, the accuracy of always guessing it."
    )


def _cell(mean: float, std: float) -> str:
    return "-" if not np.isfinite(mean) else f"{mean:.3f} ± {std:.3f}"


def _summary_cell(row: Any, metric: str) -> str:
    """Mean ± std over the seeds that trained; what was left out, said."""
    if row.seeds == 0:
        return "not trained (see errors)"
    cell = _cell(getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std"))
    return cell + (f" ({row.seeds_untrained} seed(s) not trained)" if row.seeds_untrained else "")


def _refused(row: Any) -> str:
    refused = int(row.institution_rounds_refused)
    asked = refused + int(row.institution_rounds_trained)
    return "none" if refused == 0 else f"{refused} of {asked} institution-rounds"


def tradeoff_table(results: pd.DataFrame) -> pd.DataFrame:
    """Rows: setup and privacy level; columns: each method's lead metric (mean ± std over seeds) and references.

    The reference (non-private, trained once per setup and seed) is repeated on every
    row of its setup. A federation that never trained shows "not trained" instead of
    numbers; refusals are counted in their own column.
    """
    metric = sweep_lead_metric(results)
    summary = summary_table(results)
    summary["cell"] = [_summary_cell(row, metric) for row in summary.itertuples(index=False)]
    keys = [*SETUP_KEYS, "target_epsilon", "noise_multiplier"]
    wide = summary.pivot_table(index=keys, columns="method", values="cell", aggfunc="first", sort=False)
    wide = wide[[m for m in METHODS if m in wide.columns]]
    wide.columns.name = None
    reference = summary[summary["method"] == "reference"].set_index(SETUP_KEYS)["cell"]
    if not reference.empty:
        setup_of = wide.index.droplevel(["target_epsilon", "noise_multiplier"])
        wide["reference"] = reference.reindex(setup_of).to_numpy()
    federated = summary[summary["method"] == "federated"].set_index(keys)
    columns = {}
    if metric != "accuracy":
        columns["federated accuracy"] = federated.apply(lambda r: _cell(r.accuracy_mean, r.accuracy_std), axis=1)
    columns["majority-class rate"] = federated["majority_rate"].map(lambda r: f"{r:.3f}")
    columns["epsilon spent (federated)"] = federated["epsilon"].map(lambda e: "inf" if math.isinf(e) else f"{e:.3f}")
    columns["attack AUC (federated)"] = federated["attack_auc"].map(lambda a: f"{a:.3f}" if np.isfinite(a) else "-")
    columns["refused (federated)"] = federated.apply(_refused, axis=1)
    for name, column in columns.items():
        wide[name] = column  # aligned on the setup and privacy level
    wide = wide.reset_index()
    wide.insert(
        len(SETUP_KEYS),
        "epsilon",
        [format_level(e, s) for e, s in zip(wide.pop("target_epsilon"), wide.pop("noise_multiplier"), strict=True)],
    )
    label = METRIC_LABELS[metric]
    return wide.rename(columns={m: f"{m} {label}" for m in METHODS})


def write_report(tables: dict[str, pd.DataFrame], out_dir: Path, *, title: str, notes: list[str]) -> list[Path]:
    """Write the plots and report.html (plots embedded) and report.md; return the plot paths."""
    results = tables["results"]
    metric = sweep_lead_metric(results)
    plots = {f"{metric}_vs_epsilon.png": lambda p: plot_metric_vs_epsilon(results, p, metric)}
    if metric != "accuracy":
        plots["accuracy_vs_epsilon.png"] = lambda p: plot_metric_vs_epsilon(results, p, "accuracy")
    plots[f"{metric}_over_rounds.png"] = lambda p: plot_rounds(tables["rounds"], results, p, metric)
    plots[f"per_institution_{metric}.png"] = lambda p: plot_institutions(tables["institutions"], results, p, metric)
    plots["attack_auc_vs_epsilon.png"] = lambda p: plot_metric_vs_epsilon(results, p, "attack_auc")
    paths = []
    for name, draw in plots.items():
        draw(out_dir / name)
        paths.append(out_dir / name)
    table = tradeoff_table(results)
    warned, errors = status_messages(results)
    label = METRIC_LABELS[metric]
    explanation = lead_explanation(results, metric)
    images = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem.replace('_', ' ')}</figcaption></figure>"
        for p in paths
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    alerts = "".join(
        f'<div class="{kind}"><strong>{kind.capitalize()}:</strong> {html.escape(text)}</div>'
        for kind, texts in (("error", errors), ("warning", warned))
        for text in texts
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}figure{{margin:1.5em 0}}
.error,.warning{{padding:0.6em 1em;margin:0.5em 0;border-left:6px solid}}
.error{{background:#fdecea;border-color:#d93025}}.warning{{background:#fff4e5;border-color:#f29900}}</style></head><body>
<h1>{html.escape(title)}</h1>
<ul>{notes_html}</ul>
{alerts}
<h2>Privacy / utility trade-off: {html.escape(label)}</h2>
<p><strong>{html.escape(explanation)}</strong></p>
<p>{html.escape(label[0].upper() + label[1:])} on the institutions' held-out records (mean ± standard deviation over
seeds). Every method uses the same records: <em>federated</em> is fedsilo (DP-SGD at every institution, aggregated),
<em>pooled</em> trains one model on all institutions' training records (without DP: to convergence), <em>alone</em>
gives every institution a model of its own data only, and <em>reference</em> is a non-private logistic regression
on the pooled training records (the same on every row of a setup). The majority-class rate is the accuracy of
always guessing the commonest class. Epsilon is per institution (pooled: for the pooled data) at the same delta;
the attack AUC is the loss-threshold membership-inference attack on the final federated model (0.5: no better
than a coin toss). Refused: institution-rounds in which an institution refused to train (its policy or budget).</p>
{table.to_html(index=False, escape=True)}
<h2>Plots</h2>
{images}
<p>Tables: results.csv / results.parquet (one row per configuration, seed and method, every metric), institutions.csv,
rounds.csv, summary.csv; every federated run's directory is under runs/.</p>
</body></html>
"""
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    markdown = [f"# {title}", "", *[f"- {n}" for n in notes], ""]
    markdown += [f"> **Error:** {e}\n" for e in errors] + [f"> **Warning:** {w}\n" for w in warned]
    markdown += [f"## Privacy / utility trade-off: {label}", "", explanation, "", markdown_table(table), ""]
    markdown += [f"![{p.stem}]({p.name})" for p in paths]
    (out_dir / "report.md").write_text("\n".join(markdown) + "\n", encoding="utf-8")
    return paths


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])
