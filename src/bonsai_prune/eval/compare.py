"""Two evaluations of the same problems set side by side: what one model kept of another's
figures and what it lost, problem by problem.

Every model answers the same problems, so a per-problem difference cancels how hard each
problem is: its interval is far narrower than the two models' separate intervals suggest.
Accuracies (0 or 1 per problem) get Wilson limits combined with the per-problem correlation
(MOVER, :func:`~bonsai_prune.eval.stats.paired_proportion_ratio`), which stay open where a model
solved none; continuous figures (U†, answer probability, reference NLL) a paired bootstrap.
``bonsai-prune compare EVAL --baseline EVAL`` and the experiment report both use
:func:`paired_kept` and :func:`paired_change`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from bonsai_prune.errors import DataError
from bonsai_prune.eval.stats import (
    paired_difference,
    paired_proportion_difference,
    paired_proportion_ratio,
    paired_ratio,
)

ACCURACY_PREFIX = "accuracy"  # per-problem 0/1 figures: accuracy_strict, accuracy_flexible, ...

# (key in a generation record, label, scale, format, share kept shown): the figures compared;
# a share of the reference NLL (lower is better) would read backwards, so it has none
FIGURES: tuple[tuple[str, str, float, str, bool], ...] = (
    ("accuracy_strict", "strict acc. (%)", 100.0, ".1f", True),
    ("accuracy_flexible", "flexible acc. (%)", 100.0, ".1f", True),
    ("u_dagger", "U†", 1.0, ".1f", True),
    ("answer_prob", "answer prob.", 1.0, ".3f", True),
    ("reference_nll", "ref. NLL (nats/token)", 1.0, ".3f", False),
)
# settings that change what a figure means: compared evaluations should share them
_SETTINGS = ("split", "prompt", "shots", "max_new_tokens", "weights", "accuracy", "lexical")

Interval = tuple[float, float, float]  # (estimate, low, high)


def paired_kept(
    key: str, values: list, baseline: list, n_resamples: int, seed: int
) -> Interval | None:
    """``mean(values) / mean(baseline)`` of one per-problem figure on the same problems, with a
    95% CI chosen by the figure's kind (see the module's docstring); None where undefined."""
    if key.startswith(ACCURACY_PREFIX):
        return paired_proportion_ratio(values, baseline)
    return paired_ratio(values, baseline, n_resamples, seed)


def paired_change(
    key: str, values: list, baseline: list, n_resamples: int, seed: int
) -> Interval | None:
    """Mean per-problem ``values - baseline`` of one figure with a 95% CI, as
    :func:`paired_kept` chooses it; None where undefined."""
    if key.startswith(ACCURACY_PREFIX):
        return paired_proportion_difference(values, baseline)
    return paired_difference(values, baseline, n_resamples, seed)


@dataclass(frozen=True)
class Comparison:
    """One evaluation against a baseline on the problems both answered."""

    n: int  # problems both answered
    rows: dict[str, dict]  # key -> {"model", "baseline", "kept", "change"} (intervals or None)
    settings_differ: dict[str, list]  # setting -> [this evaluation's, the baseline's]

    def to_json(self) -> dict:
        return {"n": self.n, "figures": self.rows, "settings_differ": self.settings_differ}


def read_evaluation(folder: str | Path) -> tuple[dict, list[dict]]:
    """An evaluation folder's summary and per-problem records; a one-line error if it is not
    a finished evaluation."""
    folder = Path(folder)
    summary_path, records_path = folder / "summary.json", folder / "generations.jsonl"
    if not summary_path.is_file() or not records_path.is_file():
        raise DataError(
            f"{folder} is not a finished evaluation (no summary.json and generations.jsonl): "
            "give the --out folder of `bonsai-prune evaluate`"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        with records_path.open(encoding="utf-8") as lines:
            records = [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{folder}: a file is not valid JSON ({e}); evaluate again") from None
    return summary, records


def compare_evaluations(
    folder: str | Path, baseline: str | Path, n_resamples: int = 1000, seed: int = 0
) -> Comparison:
    """``folder``'s evaluation against ``baseline``'s on the problems both answered (paired by
    problem index; a problem whose question differs is an error)."""
    summary, records = read_evaluation(folder)
    base_summary, base_records = read_evaluation(baseline)
    config, base_config = summary.get("config", {}), base_summary.get("config", {})
    if config.get("split") != base_config.get("split"):
        raise DataError(
            f"{folder} evaluated GSM8K {config.get('split')!r} and {baseline} "
            f"{base_config.get('split')!r}: compare evaluations of the same split"
        )
    by_index = {r["index"]: r for r in base_records}
    pairs = [(r, by_index[r["index"]]) for r in records if r["index"] in by_index]
    for mine, theirs in pairs:
        if mine.get("question") != theirs.get("question"):
            raise DataError(
                f"problem {mine['index']} has another question in {folder} than in {baseline}: "
                "the two evaluations read different data files"
            )
    if not pairs:
        raise DataError(f"{folder} and {baseline} share no problem: evaluate the same problems")
    rows = {}
    for key, _, _, _, with_share in FIGURES:
        values = [m.get(key) for m, _ in pairs]
        base = [b.get(key) for _, b in pairs]
        if all(v is None for v in values) or all(v is None for v in base):
            continue
        rows[key] = {
            "model": _mean(values),
            "baseline": _mean(base),
            "kept": paired_kept(key, values, base, n_resamples, seed) if with_share else None,
            "change": paired_change(key, values, base, n_resamples, seed),
        }
    differ = {
        name: [config.get(name), base_config.get(name)]
        for name in _SETTINGS
        if config.get(name) != base_config.get(name)
    }
    return Comparison(n=len(pairs), rows=rows, settings_differ=differ)


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def format_interval(value: Interval | None, scale: float, fmt: str) -> str:
    """``estimate [low, high]``, each scaled and formatted alike; ``n/a`` where undefined."""
    if not value:
        return "n/a"
    mean, low, high = (scale * v for v in value)
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def format_comparison(comparison: Comparison) -> str:
    """A plain-text table: each figure for both, the share kept and the paired change."""

    head = ["figure", "model", "baseline", "kept (model / baseline)", "change (model - baseline)"]
    lines = [[*head]]
    for key, label, scale, fmt, _ in FIGURES:
        row = comparison.rows.get(key)
        if row is None:
            continue
        lines.append(
            [
                label,
                "n/a" if row["model"] is None else format(scale * row["model"], fmt),
                "n/a" if row["baseline"] is None else format(scale * row["baseline"], fmt),
                format_interval(row["kept"], 1.0, ".2f"),
                format_interval(row["change"], scale, "+" + fmt),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [f"{comparison.n} problems both answered; paired 95% CIs"]
    text += [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    for setting, (mine, theirs) in comparison.settings_differ.items():
        text.append(
            f"note: {setting} differs ({mine!r} against {theirs!r}): the figures mean other things"
        )
    return "\n".join(text)


# the columns of the several-models table: figure, its scale and format (the share kept where
# it reads one way, the paired change for the reference NLL)
_OVERVIEW = (("accuracy_strict", 100.0, ".1f"), ("u_dagger", 1.0, ".1f"))


def format_overview(comparisons: dict[str, Comparison]) -> str:
    """Several models against one baseline, one row each: strict accuracy and U† with the share
    of the baseline's they kept, and the change of the reference NLL; paired 95% CIs."""
    head = ["model", "problems", "strict acc. (%)", "kept", "U†", "kept", "ref. NLL change"]
    lines = [head]
    for name, comparison in comparisons.items():
        row = [name, str(comparison.n)]
        for key, scale, fmt in _OVERVIEW:
            figure = comparison.rows.get(key)
            if figure is None or figure["model"] is None:
                row += ["n/a", "n/a"]
                continue
            row.append(format(scale * figure["model"], fmt))
            row.append(format_interval(figure["kept"], 1.0, ".2f"))
        nll = comparison.rows.get("reference_nll")
        row.append(format_interval(nll["change"] if nll else None, 1.0, "+.3f"))
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    for name, comparison in comparisons.items():
        for setting, (mine, theirs) in comparison.settings_differ.items():
            text.append(f"note: {name}: {setting} differs ({mine!r} against {theirs!r})")
    return "\n".join(text)
