"""The experiment report: ``OUT/report.md`` and PNG plots, rebuilt from the cell cache alone.

Every figure is read from ``OUT/cells/*/`` (eval/summary.json, run/report.json), never from
memory, so ``write_report(load_grid(path))`` rebuilds the report after any run, partial or
complete. Cells not run yet or failed appear as such rather than vanishing from the tables.
This module assembles the sections; the comparisons of models on the same problems (the
summary, against dense, paired, whole split) are :mod:`bonsai_prune.study.comparisons`, the
figures' reading and formatting :mod:`bonsai_prune.study.figures`, the plots
:mod:`bonsai_prune.study.plots`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bonsai_prune.core.weights import format_weights
from bonsai_prune.rundir import files as io
from bonsai_prune.study.comparisons import (
    against_dense_lines,
    full_split_lines,
    paired_lines,
    summary_lines,
)
from bonsai_prune.study.estimate import time_left
from bonsai_prune.study.figures import ci_text, number, scaled, spread, table_head
from bonsai_prune.study.grid import (
    DENSE_LABEL,
    MAIN_GROUP,
    Cell,
    CellRecord,
    ExperimentResult,
    Grid,
    read_records,
    recovered_key,
    scores_submodels,
)
from bonsai_prune.study.plots import plot_main

# One table column per figure: (header, value of a done record, format of a number).
COLUMNS: tuple[tuple[str, Callable[[CellRecord], float | None], str], ...] = (
    ("strict acc. % [95% CI]", lambda r: scaled(r.summary.get("accuracy_strict"), 100), ".1f"),
    ("flexible acc. %", lambda r: scaled(r.summary.get("accuracy_flexible"), 100), ".1f"),
    ("contains acc. %", lambda r: scaled(r.summary.get("accuracy_contains"), 100), ".1f"),
    (
        "lm-eval strict-match %",
        lambda r: scaled(r.summary.get("accuracy_strict_match"), 100),
        ".1f",
    ),
    (
        "lm-eval flexible-extract %",
        lambda r: scaled(r.summary.get("accuracy_flexible_extract"), 100),
        ".1f",
    ),
    ("U† [95% CI]", lambda r: r.summary.get("u_dagger"), ".1f"),
    ("answer prob.", lambda r: r.summary.get("answer_prob"), ".3f"),
    ("ref. ppl", lambda r: r.summary.get("reference_perplexity"), ".2f"),
    ("non-emb. params (M)", lambda r: scaled(r.summary.get("non_embedding_params"), 1e-6), ".1f"),
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
    records = read_records(grid)
    dense = records[grid.dense_key]
    lines = _header(grid, records, source)
    main = [c for c in shown if c.group == MAIN_GROUP]
    lines += summary_lines(grid, main, records)
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
            lines += against_dense_lines(grid, at, records)
            lines += paired_lines(grid, at, records)
    lines += full_split_lines(grid, shown, records)
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
    recoveries = [recovered_key(grid, c.key) for c in grid.unique_cells() if c.recover]
    recovered = sum(k in records and records[k].done for k in recoveries)
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
        f"{format_weights(e.weights)}; 95% CIs: Wilson for accuracies, and where two models' "
        "accuracies are compared problem by problem, their Wilson limits combined with the "
        "per-problem correlation (MOVER: Newcombe 1998 for differences, Zou & Donner 2008 for "
        f"ratios); percentile bootstrap ({e.n_bootstrap} resamples) for the other figures.",
        *_search_line(grid, records),
        f"- Cells: {len(runs)} runs + dense; {done} done, {failed} failed, "
        f"{len(runs) - done - failed} not run yet; {recovered} of their {len(recoveries)} "
        f"recoveries done; {time_left(grid, records).text()}.",
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
    searches: dict[tuple[int, int, float], list[bool]] = {}
    for c in grid.unique_cells():
        if scores_submodels(c.prune_config):
            pc = c.prune_config
            budget = (pc.masks_per_round, pc.calib_samples, pc.prune_fraction)
            searches.setdefault(budget, []).append(pc.compensate)
    if not searches:
        return []
    budgets = "; ".join(
        f"{masks} sub-models per round x {calib} calibration problems, {100 * fraction:g}% of "
        f"the parameters removed per round, {_compensation(compensated)}"
        for (masks, calib, fraction), compensated in sorted(searches.items())
    )
    scored = sum(
        (r.get("sampling") or {}).get("n_scored", 0)
        for record in records.values()
        for r in (record.prune_report or {}).get("rounds") or []
    )
    return [f"- Search (Bonsai cells): {budgets}; {scored} sub-model evaluations in the cache."]


def _compensation(compensated: list[bool]) -> str:
    """Whether a budget's cells refit before each slice, naming the exceptions."""
    if all(compensated):
        return "least-squares compensation before each slice"
    if not any(compensated):
        return "no compensation"
    return (
        "least-squares compensation before each slice "
        f"(not in {compensated.count(False)} of its {len(compensated)} cells)"
    )


def _table(cells: list[Cell], records: dict[str, CellRecord], dense: CellRecord) -> list[str]:
    headers = ["method", "seed", *(h for h, _, _ in COLUMNS), "sparsity %"]
    lines = table_head(headers)
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
        text = number(value(record), fmt)
        if header in CI_COLUMNS:
            key, scale = CI_COLUMNS[header]
            text += ci_text(record.summary.get(key), scale, fmt)
        cells.append(text)
    sparsity = scaled(_reached(record, dense), 100)
    return "| " + " | ".join([label, seed, *cells, number(sparsity, ".1f")]) + " |"


def _validity_table(cells: list[Cell], records: dict[str, CellRecord]) -> list[str]:
    """Per round of every pruned cell that recorded it: does its utility rank damage?"""
    rows = []
    for cell in cells:
        rounds = (records[cell.key].prune_report or {}).get("rounds") or []
        checks = [r["validity"] for r in rounds if r.get("validity")]
        if not checks:
            continue
        per_round = "; ".join(
            f"{100 * v['share_beaten']:.0f}% / {number(v.get('rank_correlation'), '+.2f')} / "
            f"{number(v.get('held_out_r2'), '+.2f')}" + (" (prior)" if v.get("no_signal") else "")
            for v in checks
        )
        flagged = sum(not v.get("informative", True) for v in checks)
        sampled = [r.get("sampling") or {} for r in rounds]
        scored = sum(s.get("n_scored", 0) for s in sampled)
        early = sum(s.get("stopped") not in (None, "budget") for s in sampled)
        name = cell.label if cell.group == MAIN_GROUP else f"{cell.group} / {cell.label}"
        rows.append(
            f"| {name} | {cell.prune_config.sparsity:g} | {cell.prune_config.seed} "
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
        "ours, our rules: strict / flexible %", "same text %", "texts part at char (median)",
    ]  # fmt: skip
    lines = [
        "",
        "## lm-evaluation-harness on the same problems and prompt",
        "",
        "lm-eval (`--model hf`, the model folder loaded by plain transformers, the offline task "
        "with this evaluation's prompt) against this project's evaluation of the same model: "
        "`python scripts/lmeval_agreement.py --model FOLDER --prompt chat --shots 0 --ours "
        "CELL/eval --out OUT/lmeval/NAME`. Accuracies in % with 95% Wilson intervals. Where "
        "the two greedy texts differ, the median character where they part: bf16 rounding "
        "differs between the two code paths, and a near-tie between two tokens, more common "
        "in a pruned model, turns it into another text from there on.",
        "",
        *table_head(headers),
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
            f"| {number(scaled((a.get('same_generation') or {}).get('mean'), 100), '.0f')} "
            f"| {number((a.get('diverged_at_char') or {}).get('median'), '.0f')} |"
        )
    return lines


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
    cells = [spread([value(r) for r in done], fmt) for _, value, fmt in COLUMNS]
    sparsity = spread([scaled(r.prune_report.get("sparsity"), 100) for r in done], ".1f")
    seeds = f"mean of {len(done)}" + (f"/{len(records)}" if len(done) < len(records) else "")
    return "| " + " | ".join([f"**{label}**", seeds, *cells, sparsity]) + " |"


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
    for index, versions in enumerate(sets, start=1):
        if len(sets) > 1:
            lines.append(f"Set {index} of {len(sets)} recorded by the runs:")
        lines += ["```", *(f"{name} {version}" for name, version in versions), "```"]
    return lines


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
