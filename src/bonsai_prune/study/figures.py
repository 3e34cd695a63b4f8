"""One figure of an evaluation, read from the cache and written into a report's table.

Per-problem records (``eval/generations.jsonl``) are what the paired comparisons use: every
model answers the same problems, so a per-problem difference or ratio cancels how hard each
problem is. Numbers are formatted here once, so every table prints "n/a" and CIs alike.
"""

from __future__ import annotations

import json
import statistics

from bonsai_prune.eval.compare import paired_change, paired_kept
from bonsai_prune.study.grid import Cell, CellRecord, Grid, cell_dir

# Paired comparisons: per-problem figures read from each cell's eval/generations.jsonl.
# (key in a generation record, header, scale, format)
PAIRED_METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("u_dagger", "Δ U†", 1.0, "+.1f"),
    ("reference_nll", "Δ ref. NLL (nats/token)", 1.0, "+.3f"),
    ("accuracy_strict", "Δ strict acc. (points)", 100.0, "+.1f"),
)


def table_head(headers: list[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]


def first_seeds(cells: list[Cell]) -> dict[str, Cell]:
    """label -> its cell with the lowest seed, in the cells' order of labels."""
    first: dict[str, Cell] = {}
    for c in sorted(cells, key=lambda c: c.prune_config.seed):
        first.setdefault(c.label, c)
    return first


def per_problem(grid: Grid, record: CellRecord, folder: str = "eval") -> list[dict] | None:
    """An evaluation's per-problem records (generations.jsonl), or None if not there."""
    path = cell_dir(grid, record.key) / folder / "generations.jsonl"
    if not path.is_file() or (folder == "eval" and not record.done):
        return None
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _sides(rows: list[dict] | None, base: list[dict] | None, key: str):
    if rows is None or base is None:
        return None
    return [r.get(key) for r in rows], [r.get(key) for r in base]


def kept(grid: Grid, rows: list[dict] | None, base: list[dict] | None, key: str):
    """Mean of one per-problem figure of ``rows`` over its mean in ``base`` (the same problems
    in the same order) with a paired 95% CI (:func:`bonsai_prune.eval.compare.paired_kept`):
    (ratio, low, high), or None if either is missing."""
    sides = _sides(rows, base, key)
    e = grid.eval_config
    return None if sides is None else paired_kept(key, *sides, e.n_bootstrap, e.seed)


def change(grid: Grid, rows: list[dict] | None, base: list[dict] | None, key: str):
    """Mean per-problem difference ``rows - base`` of one figure with a paired 95% CI
    (:func:`bonsai_prune.eval.compare.paired_change`), or None if either is missing."""
    sides = _sides(rows, base, key)
    e = grid.eval_config
    return None if sides is None else paired_change(key, *sides, e.n_bootstrap, e.seed)


REPEATED = ("accuracy_strict", "u_dagger", "reference_nll")  # compared where a model ran twice


def repeat_figures(first: list[dict], again: list[dict]) -> dict:
    """The problems two evaluations of one model share (by index): how many, how many got the
    same text, the largest gap in reference NLL, and each :data:`REPEATED` figure's mean over
    them in both (``<key>``: ``[first, again]``). The whole split sorts its prompts by length
    with other companions than the grid's first problems had, so in bf16 the greedy texts can
    part: this measures how much the evaluation alone moves a figure."""
    by_index = {r["index"]: r for r in first}
    pairs = [(by_index[r["index"]], r) for r in again if r["index"] in by_index]
    gaps = [
        abs(a["reference_nll"] - b["reference_nll"])
        for a, b in pairs
        if a.get("reference_nll") is not None and b.get("reference_nll") is not None
    ]
    result: dict = {
        "rows": len(pairs),
        "same_prediction": sum(a["prediction"] == b["prediction"] for a, b in pairs),
        "max_reference_nll_gap": max(gaps, default=None),
    }
    for key in REPEATED:
        both = [(a[key], b[key]) for a, b in pairs if None not in (a.get(key), b.get(key))]
        result[key] = [statistics.fmean(v) for v in zip(*both, strict=True)] if both else None
    return result


def with_ci(summary: dict, key: str, scale: float, fmt: str) -> str:
    text = number(scaled(summary.get(key), scale), fmt)
    return text + ci_text(summary.get(f"{key}_ci"), scale, fmt)


def ci_text(ci: list[float] | None, scale: float, fmt: str) -> str:
    """`` [low, high]`` of a summary's CI, scaled; empty where there is none."""
    return f" [{number(scale * ci[0], fmt)}, {number(scale * ci[1], fmt)}]" if ci else ""


def spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return number(mean, fmt)
    return f"{number(mean, fmt)} ± {number(statistics.stdev(values), fmt)}"


def scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else scale * value


def number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)
