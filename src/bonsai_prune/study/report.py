"""The experiment report: ``OUT/report.md`` and PNG plots, rebuilt from the cell cache alone.

Every figure is read from ``OUT/cells/*/`` (eval/summary.json, run/report.json), never from
memory, so ``write_report(load_grid(path))`` rebuilds the report after any run, partial or
complete. Cells not run yet or failed appear as such rather than vanishing from the tables.
The plots are drawn by :mod:`bonsai_prune.plots`; confidence intervals come from
:mod:`bonsai_prune.stats`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from bonsai_prune.core.weights import format_weights
from bonsai_prune.eval.stats import paired_difference, paired_ratio
from bonsai_prune.rundir import files as io
from bonsai_prune.study.grid import (
    DENSE_LABEL,
    FULL_EVAL_DIR,
    MAIN_GROUP,
    RECOVERED_SUFFIX,
    Cell,
    CellRecord,
    ExperimentResult,
    Grid,
    best_main_keys,
    cell_dir,
    read_cell,
    scores_submodels,
)
from bonsai_prune.study.plots import plot_main

# Paired comparisons: per-problem figures read from each cell's eval/generations.jsonl.
# (key in a generation record, header, scale, format)
PAIRED_METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("u_dagger", "Δ U†", 1.0, "+.1f"),
    ("reference_nll", "Δ ref. NLL (nats/token)", 1.0, "+.3f"),
    ("accuracy_strict", "Δ strict acc. (points)", 100.0, "+.1f"),
)
# One table column per figure: (header, value of a done record, format of a number).
COLUMNS: tuple[tuple[str, Callable[[CellRecord], float | None], str], ...] = (
    ("strict acc. % [95% CI]", lambda r: _scaled(r.summary.get("accuracy_strict"), 100), ".1f"),
    ("flexible acc. %", lambda r: _scaled(r.summary.get("accuracy_flexible"), 100), ".1f"),
    ("contains acc. %", lambda r: _scaled(r.summary.get("accuracy_contains"), 100), ".1f"),
    (
        "lm-eval strict-match %",
        lambda r: _scaled(r.summary.get("accuracy_strict_match"), 100),
        ".1f",
    ),
    (
        "lm-eval flexible-extract %",
        lambda r: _scaled(r.summary.get("accuracy_flexible_extract"), 100),
        ".1f",
    ),
    ("U† [95% CI]", lambda r: r.summary.get("u_dagger"), ".1f"),
    ("ref. ppl", lambda r: r.summary.get("reference_perplexity"), ".2f"),
    ("non-emb. params (M)", lambda r: _scaled(r.summary.get("non_embedding_params"), 1e-6), ".1f"),
    ("decode tok/s", lambda r: r.summary.get("decode_tokens_per_s"), ".1f"),
    ("prune (recovery) s", lambda r: r.run_seconds, ".0f"),
)
CI_COLUMNS = {
    "strict acc. % [95% CI]": ("accuracy_strict_ci", 100),
    "U† [95% CI]": ("u_dagger_ci", 1),
}


def write_report(source: ExperimentResult | Grid, out_dir: str | Path | None = None) -> Path:
    """Write report.md and the plots into ``out_dir`` (default: the grid's ``report``, else its
    ``out``); return the report's path. ``source``: a finished ``run_experiment`` result, or a
    grid from ``load_grid``."""
    grid = source.grid if isinstance(source, ExperimentResult) else source
    out = Path(out_dir) if out_dir is not None else (grid.report_dir or grid.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = grid.report_cells()  # each recovered cell followed by its recovery
    records = {key: read_cell(grid, key) for key in {c.key for c in shown} | {grid.dense_key}}
    dense = records[grid.dense_key]
    lines = _header(grid, records, source)
    main = [c for c in shown if c.group == MAIN_GROUP]
    lines += _summary(grid, main, records)
    plots = plot_main(out, main, records, dense)
    for group in dict.fromkeys([MAIN_GROUP, *(c.group for c in shown)]):
        cells = [c for c in shown if c.group == group]
        if not cells:
            continue
        lines += [
            "",
            f"## {'Main results' if group == MAIN_GROUP else group[:1].upper() + group[1:]}",
        ]
        if group == MAIN_GROUP:
            lines += ["", *(f"![{name}]({name})" for name in plots if "_vs_" in name)]
        for sparsity in sorted({c.prune_config.sparsity for c in cells}):
            at = [c for c in cells if c.prune_config.sparsity == sparsity]
            lines += ["", f"### Sparsity {sparsity:g}", "", *_table(at, records, dense)]
            lines += _dense_table(grid, at, records)
            lines += _paired_table(grid, at, records)
    lines += _full_split_table(grid, shown, records)
    lines += _lm_eval_table(grid)
    layer_plots = [name for name in plots if name.startswith("layers_")]
    if layer_plots:
        lines += ["", "## Kept units per layer (main methods, first seed)", ""]
        lines += [f"![{name}]({name})" for name in layer_plots]
    lines += _validity_table([c for c in grid.unique_cells()], records)
    lines += _failures(grid, records)
    lines += ["", "## Grid file", "", f"`{grid.path}`:", "", "```yaml", grid.text.rstrip(), "```"]
    lines += ["", "## Library versions", "", *_versions(records)]
    path = out / "report.md"
    io.atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---- text --------------------------------------------------------------------------------------


def _header(grid: Grid, records: dict[str, CellRecord], source) -> list[str]:
    e = grid.eval_config
    n = (records[grid.dense_key].summary or {}).get("n")
    n = n if n is not None else next((r.summary["n"] for r in records.values() if r.summary), "?")
    runs = [records[c.key] for c in grid.unique_cells()]
    done = sum(r.done for r in runs)
    failed = sum(r.error is not None and not r.done for r in runs)
    trained = {c.key for c in grid.report_cells()}  # prunes and recoveries
    prune_s = sum(records[k].run_seconds or 0.0 for k in trained if records[k].pruned)
    eval_s = sum(  # the grid's evaluations and the whole-split ones
        (r.summary or {}).get("wall_s", 0.0) + (r.full_summary or {}).get("wall_s", 0.0)
        for r in records.values()
    )
    lines = [
        "# Experiment report",
        "",
        f"Command: `bonsai-prune experiment {grid.path}`",
        "",
        f"- Model: `{e.model}` ({_dtype_used(e.dtype, records)}, {e.device}).",
        f"- Evaluation: the first {n} problems of GSM8K {e.split} (n = {n}), greedy, "
        f"{e.max_new_tokens} new tokens, {e.prompt} prompt, {e.shots}-shot; U† weights "
        f"{format_weights(e.weights)}; 95% percentile-bootstrap CIs ({e.n_bootstrap} resamples).",
        *_search_line(grid, records),
        f"- Cells: {len(runs)} runs + dense; {done} done, {failed} failed, "
        f"{len(runs) - done - failed} not run yet.",
        f"- Wall time in the cache: {_hours(prune_s + eval_s)} "
        f"(pruning and recovery {_hours(prune_s)}, evaluation {_hours(eval_s)})"
        + (
            f"; this invocation {_hours(source.wall_s)}."
            if isinstance(source, ExperimentResult)
            else "."
        ),
        "",
        "Rows with several seeds give mean ± sample standard deviation over seeds, then each seed. "
        "Parameters exclude the embeddings and the tied LM head; the sparsity column is the one "
        "reached. `prune (recovery) s` is the wall time of the prune call (after a resume, its "
        "last part), on a recovery row the recovery's (the sum of its timed parts). "
        "`decode tok/s` is what each evaluation measured while it ran: on a shared machine it "
        "reflects the load as much as the model (`bonsai-prune bench` measures speed-ups).",
    ]
    return lines


def _dtype_used(asked: str, records: dict[str, CellRecord]) -> str:
    """``auto`` with what it resolved to in the runs (bf16 or fp32 by the machine)."""
    used = sorted(
        {r.prune_report["dtype"] for r in records.values() if (r.prune_report or {}).get("dtype")}
    )
    return f"{asked}: {', '.join(used)} in the runs" if asked == "auto" and used else asked


def _search_line(grid: Grid, records: dict[str, CellRecord]) -> list[str]:
    """The search budget of the cells that score sub-models, and what the cache spent."""
    searches = sorted(
        {
            (
                c.prune_config.masks_per_round,
                c.prune_config.calib_samples,
                c.prune_config.prune_fraction,
                c.prune_config.compensate,
            )
            for c in grid.unique_cells()
            if scores_submodels(c.prune_config)
        }
    )
    if not searches:
        return []
    budgets = "; ".join(
        f"{masks} sub-models per round x {calib} calibration problems, {100 * fraction:g}% of "
        "the parameters removed per round, "
        + ("least-squares compensation before each slice" if compensate else "no compensation")
        for masks, calib, fraction, compensate in searches
    )
    scored = sum(
        (r.get("sampling") or {}).get("n_scored", 0)
        for record in records.values()
        for r in (record.prune_report or {}).get("rounds") or []
    )
    return [f"- Search (Bonsai cells): {budgets}; {scored} sub-model evaluations in the cache."]


def _summary(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """The report's answer first: what the best model at each sparsity kept of the dense model,
    and the grid's ``contrast`` (the two methods the question is about) side by side."""
    lines = _kept_summary(grid, main, records) + _contrast_summary(grid, main, records)
    return ["", "## Summary", *lines] if lines else []


def _kept_summary(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    base = _per_problem(grid, records[grid.dense_key])
    best = best_main_keys(grid, records)
    if base is None or not best:
        return []
    labels = {c.key: c.label for c in main}
    full_base = _per_problem(grid, records[grid.dense_key], FULL_EVAL_DIR)
    dense_ppl = _fmt(records[grid.dense_key].summary.get("reference_perplexity"), ".2f")
    lines = [
        "",
        f"**Kept.** At each sparsity, the main model with the highest U† on the {len(base)} "
        "problems, against the dense model on the same problems (paired bootstrap 95% CIs), "
        "and on the whole split where `full_eval` has evaluated it. The original U† study kept "
        "3% of its dense strict accuracy at 40% sparsity (GSM8K 5-shot: 14.3% -> 0.46%).",
        "",
        *_table_head(
            [
                "sparsity",
                "model",
                "strict acc. % [95% CI]",
                "strict kept (x dense)",
                "U† kept (x dense)",
                f"ref. ppl (dense {dense_ppl})",
                "whole split: strict kept (x dense)",
            ]  # fmt: skip
        ),
    ]
    for sparsity, key in best.items():
        record, rows = records[key], _per_problem(grid, records[key])
        full = _per_problem(grid, record, FULL_EVAL_DIR) if record.full_summary else None
        lines.append(
            f"| {sparsity:g} | {labels[key]} | {_with_ci(record.summary, 'accuracy_strict', 100, '.1f')} "
            f"| {_triple(_paired(grid, rows, base, 'accuracy_strict', paired_ratio), 1, '.2f')} "
            f"| {_triple(_paired(grid, rows, base, 'u_dagger', paired_ratio), 1, '.2f')} "
            f"| {_fmt(record.summary.get('reference_perplexity'), '.2f')} "
            f"| {_triple(_paired(grid, full, full_base, 'accuracy_strict', paired_ratio), 1, '.2f')} |"
        )
    return lines


def _contrast_summary(grid: Grid, main: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    if grid.contrast is None:
        return []
    a, b = grid.contrast
    lines = [
        "",
        f"**{a} against {b}.** {a} minus {b}, problem by problem on the first seed (paired "
        "bootstrap 95% CIs: which problems were drawn), and each one's U† and reference "
        "perplexity over its finished seeds (mean ± sample standard deviation, n seeds: the "
        "pruning run's own randomness).",
        "",
        *_table_head(
            [
                "sparsity",
                "stage",
                *(h for _, h, _, _ in PAIRED_METRICS),
                f"U†: {a} / {b}",
                f"ref. ppl: {a} / {b}",
            ]  # fmt: skip
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
            first = [_per_problem(grid, records[cells[0].key]) for cells in series]
            diffs = [
                _triple(_paired(grid, *first, key, paired_difference), scale, fmt)
                for key, _, scale, fmt in PAIRED_METRICS
            ]
            over_seeds = [
                " / ".join(
                    _over_seeds([records[c.key] for c in cells], key, fmt) for cells in series
                )
                for key, fmt in (("u_dagger", ".1f"), ("reference_perplexity", ".2f"))
            ]
            lines.append(f"| {sparsity:g} | {stage} | " + " | ".join(diffs + over_seeds) + " |")
    return lines


def _over_seeds(records: list[CellRecord], key: str, fmt: str) -> str:
    """``mean ± sd (n)`` of a summary figure over the finished seeds; "not run yet" if none."""
    values = [r.summary.get(key) for r in records if r.done]
    return f"{_spread(values, fmt)} ({len(values)})" if values else "not run yet"


def _table(cells: list[Cell], records: dict[str, CellRecord], dense: CellRecord) -> list[str]:
    headers = ["method", "seed", *(h for h, _, _ in COLUMNS), "sparsity %"]
    lines = _table_head(headers)
    lines.append(_row(DENSE_LABEL, "–", dense, dense))
    for label in dict.fromkeys(c.label for c in cells):
        series = sorted((c for c in cells if c.label == label), key=lambda c: c.prune_config.seed)
        if len(series) > 1:
            lines.append(_mean_row(label, [records[c.key] for c in series]))
        for c in series:
            lines.append(_row(label, str(c.prune_config.seed), records[c.key], dense))
    return lines


def _row(label: str, seed: str, record: CellRecord, dense: CellRecord) -> str:
    if not record.done:
        state = f"failed: {_short(record.error)}" if record.error else "not run yet"
        return "| " + " | ".join([label, seed, state, *[""] * len(COLUMNS)]) + " |"
    cells = []
    for header, value, fmt in COLUMNS:
        text = _fmt(value(record), fmt)
        if header in CI_COLUMNS:
            key, scale = CI_COLUMNS[header]
            text += _ci_text(record.summary.get(key), scale, fmt)
        cells.append(text)
    sparsity = _scaled(_reached(record, dense), 100)
    return "| " + " | ".join([label, seed, *cells, _fmt(sparsity, ".1f")]) + " |"


def _validity_table(cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Per round of every pruned cell that recorded it: does its utility rank damage?"""
    rows = []
    for cell in cells:
        rounds = (records[cell.key].prune_report or {}).get("rounds") or []
        checks = [r["validity"] for r in rounds if r.get("validity")]
        if not checks:
            continue
        per_round = "; ".join(
            f"{100 * v['share_beaten']:.0f}% / {_fmt(v.get('rank_correlation'), '+.2f')} / "
            f"{_fmt(v.get('held_out_r2'), '+.2f')}" + (" (prior)" if v.get("no_signal") else "")
            for v in checks
        )
        flagged = sum(not v.get("informative", True) for v in checks)
        sampled = [r.get("sampling") or {} for r in rounds]
        scored = sum(s.get("n_scored", 0) for s in sampled)
        early = sum(s.get("stopped") not in (None, "budget") for s in sampled)
        rows.append(
            f"| {cell.label} | {cell.prune_config.sparsity:g} | {cell.prune_config.seed} "
            f"| {per_round} | {flagged} of {len(checks)} | {scored} ({early} of {len(rounds)}) |"
        )
    if not rows:
        return []
    return [
        "",
        "## Utility validity per round",
        "",
        "Each round: share of sub-models the unmasked model beats / Spearman rho of parameters "
        "removed with score / the regression's held-out R^2; `(prior)`: no signal, the round "
        "selected by the prior within each module. Flagged: rounds below 90% or above rho -0.3. "
        "Scored: sub-models evaluated in all rounds (rounds whose sampling stopped early).",
        "",
        "| cell | sparsity | seed | per round | flagged | scored (early stops) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _table_head(headers: list[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]


def _first_seeds(cells: list[Cell]) -> dict[str, Cell]:
    """label -> its cell with the lowest seed, in the cells' order of labels."""
    first: dict[str, Cell] = {}
    for c in sorted(cells, key=lambda c: c.prune_config.seed):
        first.setdefault(c.label, c)
    return first


def _dense_table(grid: Grid, cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Each model against the dense model on the same problems: what it kept (ratios of means)
    and what it lost (differences), paired, with bootstrap CIs. First seed of each method."""
    base = _per_problem(grid, records[grid.dense_key])
    first = _first_seeds(cells)
    rows = {c.label: _per_problem(grid, records[c.key]) for c in first.values()}
    rows = {label: r for label, r in rows.items() if r is not None}
    if base is None or not rows:
        return []
    lines = [
        "",
        f"Against the dense model on the same {len(base)} problems (first seed; paired "
        "bootstrap 95% CIs): the share of its strict accuracy and of its U† each model kept, "
        "and the change in reference NLL (nats/token, lower is better).",
        "",
        *_table_head(["method", "strict kept (x dense)", "U† kept (x dense)", "Δ ref. NLL"]),
    ]
    for label, of in rows.items():
        kept_strict = _paired(grid, of, base, "accuracy_strict", paired_ratio)
        kept_u = _paired(grid, of, base, "u_dagger", paired_ratio)
        nll = _paired(grid, of, base, "reference_nll", paired_difference)
        lines.append(
            f"| {label} | {_triple(kept_strict, 1, '.2f')} | {_triple(kept_u, 1, '.2f')} "
            f"| {_triple(nll, 1, '+.3f')} |"
        )
    return lines


def _paired_table(grid: Grid, cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Each method minus the group's first method, problem by problem, with bootstrap CIs.

    Every model answers the same problems, so the per-problem difference cancels how hard each
    problem is: its CI is far narrower than the two separate CIs suggest. First seed of each
    method; a CI that excludes 0 is a difference the evaluation can see.
    """
    first = _first_seeds(cells)
    if len(first) < 2:
        return []
    reference, *others = first.values()
    base = _per_problem(grid, records[reference.key])
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
        *_table_head(headers),
    ]
    for cell in others:
        rows = _per_problem(grid, records[cell.key])
        texts = [cell.label]
        for key, _, scale, fmt in PAIRED_METRICS:
            texts.append(_triple(_paired(grid, rows, base, key, paired_difference), scale, fmt))
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def _full_split_table(grid: Grid, shown: list[Cell], records: dict[str, CellRecord]) -> list[str]:
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
    base = _per_problem(grid, dense, FULL_EVAL_DIR)
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
        "over the dense model's on the same problems, with a paired bootstrap CI (the original "
        "U† study kept 3% at 40% sparsity); Δ: the paired difference.",
        "",
        *_table_head(headers),
    ]
    for key in ([grid.dense_key] if dense.full_summary else []) + keys:
        s = records[key].full_summary
        label, sparsity = labels.get(key, (DENSE_LABEL, 0.0))
        texts = [
            label,
            f"{sparsity:g}",
            str(s.get("n")),
            _with_ci(s, "accuracy_strict", 100, ".1f"),
            _with_ci(s, "accuracy_flexible", 100, ".1f"),
            _with_ci(s, "accuracy_strict_match", 100, ".1f"),
            _with_ci(s, "accuracy_flexible_extract", 100, ".1f"),
            _with_ci(s, "u_dagger", 1, ".1f"),
            _fmt(s.get("reference_perplexity"), ".2f"),
        ]
        rows = None if key == grid.dense_key else _per_problem(grid, records[key], FULL_EVAL_DIR)
        texts.append(_triple(_paired(grid, rows, base, "accuracy_strict", paired_ratio), 1, ".2f"))
        diff = _paired(grid, rows, base, "accuracy_strict", paired_difference)
        texts.append(_triple(diff, 100, "+.1f"))
        lines.append("| " + " | ".join(texts) + " |")
    return lines


def _lm_eval_table(grid: Grid) -> list[str]:
    """lm-evaluation-harness's figures for models of the study, beside ours: the agreements
    ``scripts/lmeval_agreement.py --out OUT/lmeval/NAME`` wrote (the same problems and prompt)."""
    paths = sorted((grid.out / "lmeval").glob("*/agreement.json"))
    if not paths:
        return []
    headers = [
        "model", "n", "prompt, dtype",
        "lm-eval strict-match %", "lm-eval flexible-extract %",
        "ours, lm-eval's rules: strict-match / flexible-extract %",
        "ours, our rules: strict / flexible %", "same text %",
    ]  # fmt: skip
    lines = [
        "",
        "## lm-evaluation-harness on the same problems and prompt",
        "",
        "lm-eval (`--model hf`, the model folder loaded by plain transformers, the offline task "
        "with this evaluation's prompt) against this project's evaluation of the same model: "
        "`python scripts/lmeval_agreement.py --model FOLDER --prompt chat --shots 0 --ours "
        "CELL/eval --out OUT/lmeval/NAME`. Accuracies in % with 95% Wilson intervals.",
        "",
        *_table_head(headers),
    ]
    for path in paths:
        a = io.read_json(path)

        def share(key: str, a: dict = a) -> str:
            value = a.get(key)
            if not value:
                return "n/a"
            low, high = value["ci"]
            return f"{100 * value['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"

        def pair(first: str, second: str, a: dict = a) -> str:
            values = [a.get(first), a.get(second)]
            return " / ".join("n/a" if v is None else f"{100 * v['mean']:.1f}" for v in values)

        n = (a.get("lm_eval_strict_match") or {}).get("n")
        lines.append(
            f"| {path.parent.name} | {n} | {a.get('prompt', 'plain')}, {a.get('dtype')} "
            f"| {share('lm_eval_strict_match')} | {share('lm_eval_flexible_extract')} "
            f"| {pair('bonsai_prune_strict_match', 'bonsai_prune_flexible_extract')} "
            f"| {pair('bonsai_prune_strict', 'bonsai_prune_flexible')} "
            f"| {_fmt(_scaled((a.get('same_generation') or {}).get('mean'), 100), '.0f')} |"
        )
    return lines


def _with_ci(summary: dict, key: str, scale: float, fmt: str) -> str:
    text = _fmt(_scaled(summary.get(key), scale), fmt)
    return text + _ci_text(summary.get(f"{key}_ci"), scale, fmt)


def _ci_text(ci: list[float] | None, scale: float, fmt: str) -> str:
    """`` [low, high]`` of a summary's CI, scaled; empty where there is none."""
    return f" [{_fmt(scale * ci[0], fmt)}, {_fmt(scale * ci[1], fmt)}]" if ci else ""


def _triple(value: tuple[float, float, float] | None, scale: float, fmt: str) -> str:
    if not value:
        return "n/a"
    mean, low, high = (scale * v for v in value)
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _paired(grid: Grid, rows: list[dict] | None, base: list[dict] | None, key: str, how):
    """``how`` (paired_difference or paired_ratio) of one per-problem figure of ``rows`` against
    ``base``, the same problems in the same order: (mean, low, high), or None if either is
    missing."""
    if rows is None or base is None:
        return None
    e = grid.eval_config
    return how([r.get(key) for r in rows], [r.get(key) for r in base], e.n_bootstrap, e.seed)


def _per_problem(grid: Grid, record: CellRecord, folder: str = "eval") -> list[dict] | None:
    """An evaluation's per-problem records (generations.jsonl), or None if not there."""
    path = cell_dir(grid, record.key) / folder / "generations.jsonl"
    if not path.is_file() or (folder == "eval" and not record.done):
        return None
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def _reached(record: CellRecord, dense: CellRecord) -> float | None:
    """The sparsity a model reached: its prune's report, else (a recovery, which keeps its
    prune's shape) one minus its non-embedding parameters over the dense model's."""
    if record.dense:
        return 0.0
    reached = (record.prune_report or {}).get("sparsity")
    if reached is not None:
        return reached
    params = (record.summary or {}).get("non_embedding_params")
    dense_params = (dense.summary or {}).get("non_embedding_params")
    return 1.0 - params / dense_params if params and dense_params else None


def _mean_row(label: str, records: list[CellRecord]) -> str:
    done = [r for r in records if r.done]
    cells = [_spread([value(r) for r in done], fmt) for _, value, fmt in COLUMNS]
    sparsity = _spread([_scaled(r.prune_report.get("sparsity"), 100) for r in done], ".1f")
    seeds = f"mean of {len(done)}" + (f"/{len(records)}" if len(done) < len(records) else "")
    return "| " + " | ".join([f"**{label}**", seeds, *cells, sparsity]) + " |"


def _spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return _fmt(mean, fmt)
    return f"{_fmt(mean, fmt)} ± {_fmt(statistics.stdev(values), fmt)}"


def _failures(grid: Grid, records: dict[str, CellRecord]) -> list[str]:
    cells = {c.key: c for c in grid.report_cells()}.values()  # recoveries fail on their own
    failed = [c for c in cells if records[c.key].error and not records[c.key].done]
    if records[grid.dense_key].error and not records[grid.dense_key].done:
        failed.insert(0, None)
    lines = ["", "## Failed cells", ""] if failed else []
    for c in failed:
        key = grid.dense_key if c is None else c.key
        what = (
            DENSE_LABEL
            if c is None
            else f"{c.label}, sparsity {c.prune_config.sparsity:g}, seed {c.prune_config.seed}"
        )
        lines.append(f"- {what} (`cells/{key}`): {records[key].error}")
    return lines


def _versions(records: dict[str, CellRecord]) -> list[str]:
    """The versions the runs recorded (each distinct set once), else those of this process."""
    from bonsai_prune.api import library_versions

    recorded = {
        tuple(sorted(r.prune_report["versions"].items()))
        for r in records.values()
        if r.prune_report and r.prune_report.get("versions")
    }
    sets = sorted(recorded) or [tuple(sorted(library_versions().items()))]
    lines = []
    for number, versions in enumerate(sets, start=1):
        if len(sets) > 1:
            lines.append(f"Set {number} of {len(sets)} recorded by the runs:")
        lines += ["```", *(f"{name} {version}" for name, version in versions), "```"]
    return lines


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else scale * value


def _fmt(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
