"""Models set against each other on the same problems: the report's summary (what the best
model at each sparsity kept of the dense model, and the grid's ``contrast``), each model
against the dense model, each method against its group's first, and the whole-split
evaluations. Paired CIs throughout, chosen per figure by :func:`~bonsai_prune.study.figures.kept`
and :func:`~bonsai_prune.study.figures.change` (:mod:`bonsai_prune.eval.stats`)."""

from __future__ import annotations

from bonsai_prune.eval.compare import format_interval
from bonsai_prune.eval.stats import welch_difference
from bonsai_prune.study.figures import (
    PAIRED_METRICS,
    change,
    first_seeds,
    kept,
    number,
    per_problem,
    repeat_figures,
    scaled,
    spread,
    table_head,
    with_ci,
)
from bonsai_prune.study.grid import (
    DENSE_LABEL,
    FULL_EVAL_DIR,
    MAIN_GROUP,
    RECOVERED_SUFFIX,
    Cell,
    CellRecord,
    Grid,
    best_main_keys,
)


def summary_lines(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """The report's answer first: what the best model at each sparsity kept of the dense model,
    and the grid's ``contrast`` (the two methods the question is about) side by side."""
    lines = _kept_summary(grid, main, records) + _contrast_summary(grid, main, records)
    return ["", "## Summary", *lines] if lines else []


def _kept_summary(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    base = per_problem(grid, records[grid.dense_key])
    best = best_main_keys(grid, records)
    if base is None or not best:
        return []
    labels = {c.key: c.label for c in main}
    full_base = per_problem(grid, records[grid.dense_key], FULL_EVAL_DIR)
    dense_ppl = number(records[grid.dense_key].summary.get("reference_perplexity"), ".2f")
    lines = [
        "",
        f"**Kept.** At each sparsity, the main model with the highest U† on the {len(base)} "
        "problems, against the dense model on the same problems (paired 95% CIs), "
        "and on the whole split where `full_eval` has evaluated it. The original U† study kept "
        "3% of its dense strict accuracy at 40% sparsity (GSM8K 5-shot: 14.3% -> 0.46%).",
        "",
        *table_head(
            [
                "sparsity",
                "model",
                "strict acc. % [95% CI]",
                "strict kept (x dense)",
                "U† kept (x dense)",
                f"ref. ppl (dense {dense_ppl})",
                "whole split: strict kept (x dense)",
                "whole split: U† kept (x dense)",
            ]
        ),
    ]
    for sparsity, key in best.items():
        record, rows = records[key], per_problem(grid, records[key])
        full = per_problem(grid, record, FULL_EVAL_DIR) if record.full_summary else None
        lines.append(
            f"| {sparsity:g} | {labels[key]} | {with_ci(record.summary, 'accuracy_strict', 100, '.1f')} "
            f"| {format_interval(kept(grid, rows, base, 'accuracy_strict'), 1, '.2f')} "
            f"| {format_interval(kept(grid, rows, base, 'u_dagger'), 1, '.2f')} "
            f"| {number(record.summary.get('reference_perplexity'), '.2f')} "
            f"| {format_interval(kept(grid, full, full_base, 'accuracy_strict'), 1, '.2f')} "
            f"| {format_interval(kept(grid, full, full_base, 'u_dagger'), 1, '.2f')} |"
        )
    return lines


def _contrast_summary(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    if grid.contrast is None:
        return []
    a, b = grid.contrast
    lines = [
        "",
        f"**{a} against {b}.** {a} minus {b}, problem by problem on the first seed (paired "
        "95% CIs: which problems were drawn), and each one's U† and reference "
        "perplexity over its finished seeds (mean ± sample standard deviation, n seeds: the "
        "pruning run's own randomness) with the difference of the seed means (Welch's 95% "
        "CI, where both have two seeds or more).",
        "",
        *table_head(
            [
                "sparsity",
                "stage",
                *(h for _, h, _, _ in PAIRED_METRICS),
                f"U†: {a} / {b}",
                "Δ U† over seeds",
                f"ref. ppl: {a} / {b}",
                "Δ ref. ppl over seeds",
            ]
        ),
    ]
    for sparsity in sorted({c.prune_config.sparsity for c in main}):
        for suffix, stage in (("", "pruned"), (RECOVERED_SUFFIX, "recovered")):
            series = [
                sorted(
                    (
                        c
                        for c in main
                        if c.label == label + suffix and c.prune_config.sparsity == sparsity
                    ),
                    key=lambda c: c.prune_config.seed,
                )
                for label in (a, b)
            ]
            if not all(series):
                continue
            first = [per_problem(grid, records[cells[0].key]) for cells in series]
            diffs = [
                format_interval(change(grid, *first, key), scale, fmt)
                for key, _, scale, fmt in PAIRED_METRICS
            ]
            over_seeds = []
            for key, fmt in (("u_dagger", ".1f"), ("reference_perplexity", ".2f")):
                seeds = [[records[c.key] for c in cells] for cells in series]
                over_seeds.append(" / ".join(_over_seeds(r, key, fmt) for r in seeds))
                values = [_seed_values(r, key) for r in seeds]
                over_seeds.append(format_interval(welch_difference(*values), 1, "+" + fmt))
            lines.append(f"| {sparsity:g} | {stage} | " + " | ".join(diffs + over_seeds) + " |")
    return lines


def _seed_values(records: list[CellRecord], key: str) -> list[float]:
    """A summary figure of each finished seed that has it."""
    values = [r.summary.get(key) for r in records if r.done]
    return [v for v in values if v is not None]


def _over_seeds(records: list[CellRecord], key: str, fmt: str) -> str:
    """``mean ± sd (n)`` of a summary figure over the finished seeds; "not run yet" if none."""
    values = [r.summary.get(key) for r in records if r.done]
    return f"{spread(values, fmt)} ({len(values)})" if values else "not run yet"


def against_dense_lines(grid: Grid, cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Each model against the dense model on the same problems: what it kept (ratios of means)
    and what it lost (differences), paired, with CIs. First seed of each method."""
    base = per_problem(grid, records[grid.dense_key])
    first = first_seeds(cells)
    rows = {c.label: per_problem(grid, records[c.key]) for c in first.values()}
    rows = {label: r for label, r in rows.items() if r is not None}
    if base is None or not rows:
        return []
    lines = [
        "",
        f"Against the dense model on the same {len(base)} problems (first seed; paired "
        "95% CIs): the share of its strict accuracy and of its U† each model kept, "
        "and the change in reference NLL (nats/token, lower is better).",
        "",
        *table_head(["method", "strict kept (x dense)", "U† kept (x dense)", "Δ ref. NLL"]),
    ]
    for label, of in rows.items():
        kept_strict = kept(grid, of, base, "accuracy_strict")
        kept_u = kept(grid, of, base, "u_dagger")
        nll = change(grid, of, base, "reference_nll")
        lines.append(
            f"| {label} | {format_interval(kept_strict, 1, '.2f')} | {format_interval(kept_u, 1, '.2f')} "
            f"| {format_interval(nll, 1, '+.3f')} |"
        )
    return lines


def paired_lines(grid: Grid, cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Each method minus the group's first method, problem by problem, with paired CIs.

    Every model answers the same problems, so the per-problem difference cancels how hard each
    problem is: its CI is far narrower than the two separate CIs suggest. First seed of each
    method; a CI that excludes 0 is a difference the evaluation can see.
    """
    first = first_seeds(cells)
    if len(first) < 2:
        return []
    reference, *others = first.values()
    base = per_problem(grid, records[reference.key])
    if base is None:
        return []
    headers = ["method", *(h for _, h, _, _ in PAIRED_METRICS)]
    lines = [
        "",
        f"Paired differences from **{reference.label}** (seed {reference.prune_config.seed}) "
        f"on the same {len(base)} problems, mean [95% CI]; lower NLL is better. The CI covers "
        "which problems were drawn, not the pruning run's own randomness: set it beside the "
        "spread over seeds above.",
        "",
        *table_head(headers),
    ]
    for cell in others:
        rows = per_problem(grid, records[cell.key])
        texts = [cell.label]
        for key, _, scale, fmt in PAIRED_METRICS:
            texts.append(format_interval(change(grid, rows, base, key), scale, fmt))
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def full_split_lines(grid: Grid, shown: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """The whole-split evaluations (``full_eval``): each model's figures, and its strict accuracy
    beside the dense model's on the same problems (kept share and difference, paired)."""
    dense = records[grid.dense_key]
    labels: dict[str, tuple[str, float]] = {}
    for c in sorted(shown, key=lambda c: c.group != MAIN_GROUP):  # a main label first
        labels.setdefault(c.key, (c.label, c.prune_config.sparsity))
    keys = [k for k, r in records.items() if r.full_summary and k != grid.dense_key]
    keys.sort(key=lambda k: (labels[k][1], labels[k][0]))
    if dense.full_summary is None and not keys:
        return []
    base = per_problem(grid, dense, FULL_EVAL_DIR)
    headers = [
        "model", "sparsity", "n", "strict acc. % [95% CI]", "flexible acc. % [95% CI]",
        "lm-eval strict-match % [95% CI]", "lm-eval flexible-extract % [95% CI]",
        "U† [95% CI]", "ref. ppl", "strict kept (x dense) [95% CI]", "Δ strict (points) [95% CI]",
    ]  # fmt: skip
    lines = [
        "",
        "## The whole test split",
        "",
        "The dense model and, at each sparsity, the main model with the highest U† above, "
        "evaluated on every problem of the split (`full_eval: true`). *Kept*: strict accuracy "
        "over the dense model's on the same problems, with a paired CI (the original "
        "U† study kept 3% at 40% sparsity); Δ: the paired difference.",
        "",
        *table_head(headers),
    ]
    for key in ([grid.dense_key] if dense.full_summary else []) + keys:
        s = records[key].full_summary
        label, sparsity = labels.get(key, (DENSE_LABEL, 0.0))
        texts = [
            label,
            f"{sparsity:g}",
            str(s.get("n")),
            with_ci(s, "accuracy_strict", 100, ".1f"),
            with_ci(s, "accuracy_flexible", 100, ".1f"),
            with_ci(s, "accuracy_strict_match", 100, ".1f"),
            with_ci(s, "accuracy_flexible_extract", 100, ".1f"),
            with_ci(s, "u_dagger", 1, ".1f"),
            number(s.get("reference_perplexity"), ".2f"),
        ]
        rows = None if key == grid.dense_key else per_problem(grid, records[key], FULL_EVAL_DIR)
        texts.append(format_interval(kept(grid, rows, base, "accuracy_strict"), 1, ".2f"))
        diff = change(grid, rows, base, "accuracy_strict")
        texts.append(format_interval(diff, 100, "+.1f"))
        lines.append("| " + " | ".join(texts) + " |")
    shown_keys = ([grid.dense_key] if dense.full_summary else []) + keys
    return lines + _repeat_lines(grid, records, shown_keys, labels)


def _repeat_lines(
    grid: Grid, records: dict[str, CellRecord], keys: list[str], labels: dict
) -> list[str]:
    """Each whole-split model's figures on the grid's problems, measured twice: the noise the
    evaluation itself adds (bf16 greedy decoding in other batches)."""
    rows = []
    for key in keys:
        first = per_problem(grid, records[key])
        whole = per_problem(grid, records[key], FULL_EVAL_DIR)
        if first is None or whole is None:
            continue
        r = repeat_figures(first, whole)
        if not r["rows"]:
            continue

        def twice(name: str, scale: float, fmt: str, r: dict = r) -> str:
            a, b = r[name] or (None, None)
            return f"{number(scaled(a, scale), fmt)} / {number(scaled(b, scale), fmt)}"

        rows.append(
            f"| {labels.get(key, (DENSE_LABEL, 0.0))[0]} | {r['rows']} | {r['same_prediction']} "
            f"| {twice('accuracy_strict', 100, '.1f')} | {twice('u_dagger', 1, '.1f')} "
            f"| {twice('reference_nll', 1, '.4f')} | {number(r['max_reference_nll_gap'], '.3f')} |"
        )
    if not rows:
        return []
    return [
        "",
        "The grid's problems are the split's first ones, so each model above answered them "
        "twice: in the grid's evaluation and inside the whole split, where prompts, batched by "
        "length, had other companions. In bf16 the greedy texts part there; the gap between "
        "the two figures is what the evaluation alone moves them, and a difference between "
        "models smaller than it is noise:",
        "",
        *table_head(
            [
                "model",
                "problems",
                "same texts",
                "strict % (grid / whole split)",
                "U† (grid / whole split)",
                "ref. NLL (grid / whole split)",
                "largest per-problem NLL gap",
            ]
        ),  # fmt: skip
        *rows,
    ]
