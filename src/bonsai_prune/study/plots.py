"""The experiment report's figures: metric against sparsity, and kept units per layer.

Drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot state) from the
cell records alone, so the report can be rebuilt from the cache at any time.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from bonsai_prune.study.grid import DENSE_LABEL, RECOVERED_SUFFIX, Cell, CellRecord

PLOT_DPI = 120


def plot_main(
    out: Path, cells: list[Cell], records: dict[str, CellRecord], dense: CellRecord
) -> list[str]:
    """The main group's plots; returns the names of the files written."""
    series = _series(cells, records)
    if not series:
        return []
    written = []
    for name, key, scale, ylabel in (
        ("accuracy_vs_sparsity.png", "accuracy_strict", 100, "GSM8K strict accuracy (%)"),
        ("flexible_vs_sparsity.png", "accuracy_flexible", 100, "GSM8K flexible accuracy (%)"),
        ("udagger_vs_sparsity.png", "u_dagger", 1, "U† (0-100)"),
        ("perplexity_vs_sparsity.png", "reference_perplexity", 1, "reference perplexity (log)"),
        ("answer_prob_vs_sparsity.png", "answer_prob", 1, "probability of the reference answer"),
    ):
        _metric_plot(out / name, series, dense, key, scale, ylabel)
        written.append(name)
    pruned = {k: v for k, v in series.items() if not k.endswith(RECOVERED_SUFFIX)}
    for sparsity in sorted({s for points in pruned.values() for s in points}):
        name = f"layers_{sparsity:g}.png"  # a recovery keeps its prune's shape: drawn once
        if _layers_plot(out / name, pruned, dense, sparsity):
            written.append(name)
    return written


def _series(cells: list[Cell], records) -> dict[str, dict[float, list[CellRecord]]]:
    """label -> sparsity -> the done records of its seeds (seed order)."""
    series: dict[str, dict[float, list[CellRecord]]] = {}
    for c in sorted(cells, key=lambda c: c.prune_config.seed):
        if records[c.key].done:
            points = series.setdefault(c.label, {})
            points.setdefault(c.prune_config.sparsity, []).append(records[c.key])
    return series


def _metric_plot(
    path: Path, series, dense: CellRecord, key: str, scale: float, ylabel: str
) -> None:
    """One line per method: the mean over seeds; error bars span the seeds' 95% CIs (their
    union), or ± the standard deviation over seeds for a metric without a CI. A method after
    recovery is drawn dotted in its method's colour, so before and after read as one pair."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    offsets = _offsets(len(series))
    colours = _colours(series)
    for (label, points), offset in zip(series.items(), offsets, strict=True):
        xs, ys, low, high = [], [], [], []
        for sparsity in sorted(points):
            values = [
                r.summary[key] * scale for r in points[sparsity] if r.summary.get(key) is not None
            ]
            if not values:
                continue
            mean = statistics.fmean(values)
            cis = [r.summary.get(f"{key}_ci") for r in points[sparsity]]
            if all(cis):
                lo, hi = min(c[0] for c in cis) * scale, max(c[1] for c in cis) * scale
            else:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                lo, hi = mean - sd, mean + sd
            xs.append(sparsity + offset)
            ys.append(mean)
            low.append(max(mean - lo, 0.0))
            high.append(max(hi - mean, 0.0))
        recovered = label.endswith(RECOVERED_SUFFIX)
        ax.errorbar(
            xs,
            ys,
            yerr=[low, high],
            marker="s" if recovered else "o",
            linestyle=":" if recovered else "-",
            color=colours[label],
            capsize=3,
            label=label,
        )
    if dense.done and dense.summary.get(key) is not None:
        ax.axhline(dense.summary[key] * scale, color="black", linestyle="--", label=DENSE_LABEL)
        ci = dense.summary.get(f"{key}_ci")
        if ci:
            ax.axhspan(ci[0] * scale, ci[1] * scale, color="black", alpha=0.08)
    if key == "reference_perplexity":
        ax.set_yscale("log")
    else:  # accuracy and U† start at 0 (and an all-zero plot gets a readable scale)
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))
    ax.set_xlabel("target sparsity (non-embedding parameters removed)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)


def _layers_plot(path: Path, series, dense: CellRecord, sparsity: float) -> bool:
    """FinerCut-style: kept query heads and kept MLP neurons per layer, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    lines = {
        label: points[sparsity][0].structure["layers"]
        for label, points in series.items()
        if sparsity in points and points[sparsity][0].structure
    }
    if not lines:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    heads_ax, neurons_ax = fig.subplots(1, 2)
    if dense.structure:
        lines = {DENSE_LABEL: dense.structure["layers"], **lines}
    for label, layers in lines.items():
        style = {"color": "black", "linestyle": "--"} if label == DENSE_LABEL else {"marker": "."}
        heads_ax.plot([layer["query_heads"] for layer in layers], label=label, **style)
        neurons_ax.plot([layer["intermediate_size"] for layer in layers], label=label, **style)
    heads_ax.set_ylabel("kept query heads")
    neurons_ax.set_ylabel("kept MLP neurons")
    for ax in (heads_ax, neurons_ax):
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    neurons_ax.legend(fontsize="small")
    fig.suptitle(f"kept units per layer at sparsity {sparsity:g}")
    _save(fig, path)
    return True


def _colours(series: dict) -> dict[str, str]:
    """One colour per method (matplotlib's cycle), shared by its "+ recovery" series."""
    methods = list(dict.fromkeys(label.removesuffix(RECOVERED_SUFFIX) for label in series))
    cycle = [f"C{i % 10}" for i in range(len(methods))]
    by_method = dict(zip(methods, cycle, strict=True))
    return {label: by_method[label.removesuffix(RECOVERED_SUFFIX)] for label in series}


def _offsets(n: int, step: float = 0.004) -> list[float]:
    """Small x shifts so the error bars of methods at one sparsity do not hide each other."""
    return [(i - (n - 1) / 2) * step for i in range(n)]


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    os.replace(tmp, path)
