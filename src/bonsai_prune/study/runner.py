"""Running a grid: prune and evaluate each cell not yet in the cache, one line per cell.

A killed study resumes at its first unfinished cell (and inside a cell, an iterative method
resumes at its first unfinished round, a recovery at its last checkpoint). The report is the
caller's to write (:func:`bonsai_prune.study.report.write_report`), from the cache alone.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from bonsai_prune.errors import BonsaiPruneError, ConfigError, DataError
from bonsai_prune.eval.gsm8k import add_answer_probabilities, add_lm_eval_accuracies, evaluate
from bonsai_prune.memory import release_free_memory
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.models.loading import load_model, resolve_dtype
from bonsai_prune.models.pruned import is_pruned_dir, load_pruned
from bonsai_prune.recover import recover
from bonsai_prune.rundir import files as io
from bonsai_prune.study.estimate import time_left
from bonsai_prune.study.grid import (
    DENSE_LABEL,
    FULL_EVAL_DIR,
    RECOVERED_SUFFIX,
    Cell,
    CellOutcome,
    ExperimentResult,
    Grid,
    cell_dir,
    full_eval_keys,
    load_grid,
    read_cell,
    read_records,
    recovered_key,
    settled_best_keys,
)
from bonsai_prune.study.rebuild import (
    AGREEMENT_FILE,
    agreement,
    prune_resuming,
    restore_weights,
)

Loader = Callable[..., tuple]  # (spec, *, dtype, device) -> (model, tokenizer), like load_model


def run_experiment(
    grid_path: str | Path,
    *,
    progress: bool = True,
    only: str | Sequence[str] | None = None,
    load: Loader | None = None,
) -> ExperimentResult:
    """Prune and evaluate every cell of a grid file not already in its cache, then report.

    progress: tqdm bars inside each prune and evaluation (one line per cell is always printed).
    only: run just the cells whose name (label), group or key is one of these; the dense
        evaluation always runs (``only="dense"`` runs no cell: the dense model and, with
        ``full_eval``, the whole-split evaluations of the best finished models), and the report
        shows every cell the cache holds.
    load: ``(spec, *, dtype, device) -> (model, tokenizer)``; default :func:`load_model`
        (tests pass a tiny model here).
    """
    began = time.perf_counter()
    grid = load_grid(grid_path)
    load = load or load_model
    cells = _select(grid, only)
    _upgrade_cache(grid)
    _add_answer_probs(grid, load, progress)
    print(f"experiment {grid.path}: {len(cells)} cell(s) + dense -> {grid.out}", flush=True)
    print(f"the whole grid: {time_left(grid, read_records(grid)).text()}", flush=True)
    outcomes = [_run_dense(grid, load, progress)]
    failed: set[str] = set()  # whole-split evaluations that failed in this run
    print(f"[dense] {_cell_line(grid, None, outcomes[0])}", flush=True)
    if grid.full_eval:  # the dense model's whole-split figures do not wait for the grid
        _append(outcomes, _run_full_eval(grid, grid.dense_key, load, progress))
    for number, cell in enumerate(cells, start=1):
        outcome = _run_cell(grid, cell, load, progress)
        _append(outcomes, outcome)
        print(f"[{number}/{len(cells)}] {_cell_line(grid, cell, outcome)}", flush=True)
        rebuilt = (
            cell.recover and outcome.status == "cached" and _parent_weights_missing(grid, cell)
        )
        if rebuilt:
            outcome = _run_cell(grid, cell, load, progress, rebuild=True)
            _append(outcomes, outcome)
            line = _cell_line(grid, cell, outcome, " (rebuilt: its weights are not in the cache)")
            print(f"[{number}/{len(cells)}] {line}", flush=True)
        if cell.recover and outcome.status != "failed":
            outcome = _run_recovery(grid, cell, progress, fresh=rebuilt)
            _append(outcomes, outcome)
            line = _cell_line(grid, cell, outcome, RECOVERED_SUFFIX)
            print(f"[{number}/{len(cells)}] {line}", flush=True)
        if grid.full_eval:  # a sparsity whose main cells have all finished: its best, now
            records = read_records(grid)
            for key in settled_best_keys(grid, records).values():
                if records[key].full_summary is None and key not in failed:
                    _append(outcomes, _run_full_eval(grid, key, load, progress))
                    if outcomes[-1].status == "failed":  # retried at the next run, not after
                        failed.add(key)  # every cell of this one (a refused rebuild is long)
    if grid.full_eval:
        for key in full_eval_keys(grid, read_records(grid))[1:]:  # the dense model's ran first
            if key not in failed:
                _append(outcomes, _run_full_eval(grid, key, load, progress))
    return ExperimentResult(grid, outcomes, time.perf_counter() - began)


def _append(outcomes: list[CellOutcome], outcome: CellOutcome) -> None:
    """Record a finished stage and give the memory it freed back to the OS: without it the
    study process kept a recovery's fragmented heap (~12 GB) through the evaluations after."""
    outcomes.append(outcome)
    release_free_memory()


def _upgrade_cache(grid: Grid) -> None:
    """Give evaluations cached before lm-evaluation-harness's rules were reported those figures
    (they read only the saved texts), so old and new cells fill the same columns."""
    for summary in sorted((grid.out / "cells").glob("**/summary.json")):
        if summary.parent.name in ("eval", FULL_EVAL_DIR):
            add_lm_eval_accuracies(summary.parent)


REFUSED = "answer_prob_refused.txt"  # an evaluation whose model failed the NLL check: not retried


def _add_answer_probs(grid: Grid, load: Loader, progress: bool) -> None:
    """Give cached evaluations made before the answer probability was reported that figure
    (``eval.gsm8k.add_answer_probabilities``: the reference pass again, each model loaded from
    the cache). Models whose weights are not in the cache (a fresh checkout) are named in one
    line and left; an evaluation its saved model does not reproduce is marked (``REFUSED``) so
    that later starts do not pay for the same refusal."""
    todo: dict[str, list[Path]] = {}
    for key, record in read_records(grid).items():
        for name, summary in (("eval", record.summary), (FULL_EVAL_DIR, record.full_summary)):
            folder = cell_dir(grid, key) / name
            if summary and "config" in summary and summary.get("answer_prob") is None:
                if not (folder / REFUSED).exists():
                    todo.setdefault(key, []).append(folder)
    weightless = [
        k for k in todo if k != grid.dense_key and not is_pruned_dir(cell_dir(grid, k) / "run")
    ]
    if weightless:
        names = ", ".join(weightless)
        print(f"[answer prob.] left without (weights not in the cache): {names}", flush=True)
    for key in (k for k in todo if k not in weightless):
        try:
            model, tokenizer, _ = _load_evaluated(grid, key, grid.eval_config, load)
        except BonsaiPruneError as e:
            print(f"[answer prob.] {key}: FAILED {e}", flush=True)
            continue
        for folder in todo[key]:
            try:
                add_answer_probabilities(folder, model, tokenizer, progress=progress)
            except DataError as e:
                io.atomic_write_text(folder / REFUSED, f"{e}\n")
                print(f"[answer prob.] {key}/{folder.name}: REFUSED {e}", flush=True)
                continue
            added = io.read_json(folder / "summary.json")["answer_prob"]
            print(f"[answer prob.] {key}/{folder.name}: {_number(added, 1, '.3f')}", flush=True)


def _load_evaluated(grid: Grid, key: str, config, load: Loader) -> tuple:
    """``(model, tokenizer, config)`` for evaluating ``key`` under ``config``: the dense model
    through ``load``, or the cell's saved run cast to the evaluation's dtype (its config then
    names that run, so the evaluation sizes the files on disk)."""
    if key == grid.dense_key:
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        return model, tokenizer, config
    run = cell_dir(grid, key) / "run"
    model, tokenizer = load_pruned(run, device=config.device)
    model = model.to(resolve_dtype(config.dtype, config.device))
    return model, tokenizer, replace(config, model=str(run))


def _select(grid: Grid, only: str | Sequence[str] | None) -> list[Cell]:
    cells = grid.unique_cells()
    if only is None:
        return cells
    wanted = {only} if isinstance(only, str) else set(only)
    if wanted == {DENSE_LABEL}:
        return []
    chosen = {c.key for c in grid.cells if wanted & {c.label, c.group, c.key}}
    if not chosen:
        names = sorted({c.label for c in grid.cells} | {c.group for c in grid.cells})
        raise ConfigError(
            f"--only {', '.join(sorted(wanted))} matches no cell; names: {', '.join(names)}"
        )
    return [c for c in cells if c.key in chosen]


def _run_dense(grid: Grid, load: Loader, progress: bool) -> CellOutcome:
    folder, config = cell_dir(grid, grid.dense_key), grid.eval_config
    if read_cell(grid, grid.dense_key).done:
        return CellOutcome(grid.dense_key, DENSE_LABEL, "cached", 0.0)
    began = time.perf_counter()
    try:
        model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
        io.atomic_write_json(folder / "structure.json", adapter_for(model).structure(model))
        evaluate(
            config, model=model, tokenizer=tokenizer, out_dir=folder / "eval", progress=progress
        )
    except BonsaiPruneError as e:
        return _failed(folder, grid.dense_key, DENSE_LABEL, e, began)
    (folder / "error.json").unlink(missing_ok=True)
    return CellOutcome(grid.dense_key, DENSE_LABEL, "ran", time.perf_counter() - began)


def _parent_weights_missing(grid: Grid, cell: Cell) -> bool:
    """A recovery still to run whose pruned parent's weights are gone: the cache keeps
    figures, not weights (``.gitignore``), so a fresh checkout has the cell but not its model."""
    recovery = read_cell(grid, recovered_key(grid, cell.key))
    return not recovery.done and not is_pruned_dir(cell_dir(grid, cell.key) / "run")


def _run_cell(
    grid: Grid, cell: Cell, load: Loader, progress: bool, rebuild: bool = False
) -> CellOutcome:
    """Prune (or resume, or reload a finished prune) and evaluate one cell; ``rebuild``: prune
    and evaluate it afresh although it is cached (its recovery needs the weights)."""
    folder, config = cell_dir(grid, cell.key), cell.prune_config
    record = read_cell(grid, cell.key)
    if record.done and not rebuild:
        return CellOutcome(cell.key, cell.label, "cached", 0.0)
    began = time.perf_counter()
    run = folder / "run"
    io.atomic_write_json(
        folder / "cell.json",
        {
            "key": cell.key,
            "label": cell.label,
            "group": cell.group,
            "grid": grid.path,
            "prune_config": config.to_dict(),
            "eval_config": grid.eval_config.to_dict(),
        },
    )
    try:
        if (record.prune_report or {}).get("complete") and is_pruned_dir(run) and not rebuild:
            model, tokenizer = load_pruned(run, device=config.device)  # only the eval was lost
            model = model.to(resolve_dtype(config.dtype, config.device))
        else:
            pruned = prune_resuming(config, run, load, progress, fresh=rebuild)
            model, tokenizer = pruned.model, pruned.tokenizer
        _evaluate_run(grid, run, model, tokenizer, folder, progress)
    except Exception as e:  # one cell's failure, even a bug, must not stop the grid
        return _failed(folder, cell.key, cell.label, e, began)
    (folder / "error.json").unlink(missing_ok=True)
    return CellOutcome(cell.key, cell.label, "ran", time.perf_counter() - began)


def _run_recovery(grid: Grid, cell: Cell, progress: bool, fresh: bool = False) -> CellOutcome:
    """Distil a pruned cell from its dense parent (resuming a killed recovery; ``fresh``: its
    parent was rebuilt, so a killed recovery starts over) and evaluate it."""
    key = recovered_key(grid, cell.key)
    folder, label = cell_dir(grid, key), cell.label + RECOVERED_SUFFIX
    record = read_cell(grid, key)
    if record.done:
        return CellOutcome(key, label, "cached", 0.0)
    began = time.perf_counter()
    run = folder / "run"
    try:
        if record.pruned and is_pruned_dir(run):  # only the evaluation was lost
            model, tokenizer = load_pruned(run, device=cell.prune_config.device)
        else:
            started = (run / "report.json").is_file() and not fresh
            result = recover(
                cell_dir(grid, cell.key) / "run",
                run,
                grid.recover_config,
                resume=started,
                overwrite=not started,
                progress=progress,
            )
            model, tokenizer = result.model, result.tokenizer
        model = model.to(resolve_dtype(cell.prune_config.dtype, cell.prune_config.device))
        _evaluate_run(grid, run, model, tokenizer, folder, progress)
    except Exception as e:  # as in _run_cell
        return _failed(folder, key, label, e, began)
    (folder / "error.json").unlink(missing_ok=True)
    return CellOutcome(key, label, "ran", time.perf_counter() - began)


def _run_full_eval(grid: Grid, key: str, load: Loader, progress: bool) -> CellOutcome:
    """Evaluate the dense model or a finished cell's model on the whole split (``eval-full/``)."""
    folder, label = cell_dir(grid, key), f"{key} on the whole split"
    if read_cell(grid, key).full_summary is not None:
        outcome = CellOutcome(key, label, "cached", 0.0)
    else:
        began = time.perf_counter()
        try:
            if key != grid.dense_key:  # a fresh checkout has the figures, not the weights
                for line in restore_weights(grid, key, load, progress):
                    print(f"[whole split] {key}: {line}", flush=True)
            model, tokenizer, config = _load_evaluated(grid, key, grid.full_eval_config, load)
            evaluate(
                config,
                model=model,
                tokenizer=tokenizer,
                out_dir=folder / FULL_EVAL_DIR,
                progress=progress,
            )
        except Exception as e:  # as in _run_cell; the cell's own error.json stays its prune's
            error = str(e) if isinstance(e, BonsaiPruneError) else f"{type(e).__name__}: {e}"
            outcome = CellOutcome(key, label, "failed", time.perf_counter() - began, error)
        else:
            outcome = CellOutcome(key, label, "ran", time.perf_counter() - began)
    if outcome.status == "ran" or not (folder / FULL_EVAL_DIR / AGREEMENT_FILE).is_file():
        _print_agreement(grid, key)
    summary = read_cell(grid, key).full_summary or {}
    figures = (
        f"strict {_number(summary.get('accuracy_strict'), 100, '.1f')}% of {summary.get('n')}"
        f"  U† {_number(summary.get('u_dagger'), 1, '.1f')}"
        f"  ppl {_number(summary.get('reference_perplexity'), 1, '.2f')}"
    )
    state = f"FAILED {outcome.error}" if outcome.status == "failed" else outcome.status
    print(f"[whole split] {key}: {state}" + (f"  {figures}" if summary else ""), flush=True)
    return outcome


def _print_agreement(grid: Grid, key: str) -> None:
    """The rows a whole-split evaluation shares with the grid's: the same model, evaluated
    again, must give the same texts (a rebuilt one included)."""
    shared = agreement(grid, key)
    if shared and shared["rows"]:
        print(
            f"[whole split] {key}: its first {shared['rows']} rows repeat the grid's evaluation:"
            f" {shared['same_prediction']} same texts, reference NLL within"
            f" {_number(shared['max_reference_nll_gap'], 1, '.2g')}",
            flush=True,
        )


def _evaluate_run(grid: Grid, run: Path, model, tokenizer, folder: Path, progress: bool) -> None:
    """Evaluate a pruned (or recovered) run's model into ``folder/eval``; the evaluation names
    ``run`` as the model, so it sizes the files on disk."""
    labelled = replace(grid.eval_config, model=str(run))
    evaluate(labelled, model=model, tokenizer=tokenizer, out_dir=folder / "eval", progress=progress)


def _failed(folder: Path, key: str, label: str, error: Exception, began: float) -> CellOutcome:
    """Record a failed cell (retried at the next run) and go on with the grid. An error of the
    package's own says what to change; anything else is a bug, kept with its traceback in
    ``error.json`` so that a night's grid does not stop at it."""
    message = f"{type(error).__name__}: {error}"
    record = {"error": message}
    if not isinstance(error, BonsaiPruneError):
        record["traceback"] = traceback.format_exception(error)
        message += f" (unexpected: traceback in {folder / 'error.json'})"
    io.atomic_write_json(folder / "error.json", record)
    return CellOutcome(key, label, "failed", time.perf_counter() - began, message)


def _cell_line(grid: Grid, cell: Cell | None, outcome: CellOutcome, suffix: str = "") -> str:
    """One line per finished cell: what it is, then its headline figures or why it failed."""
    what = (
        DENSE_LABEL
        if cell is None
        else (
            f"{cell.label}{suffix} s={cell.prune_config.sparsity:g} seed={cell.prune_config.seed}"
        )
    )
    if outcome.status == "failed":
        return f"{what}: FAILED {outcome.error}"
    if outcome.status == "cached":
        return f"{what}: cached ({outcome.key})"
    record = read_cell(grid, outcome.key)
    s = record.summary or {}
    low, high = s.get("accuracy_strict_ci") or (None, None)
    prune_s = record.run_seconds
    return (
        f"{what}: strict {_number(s.get('accuracy_strict'), 100, '.1f')}%"
        f" [{_number(low, 100, '.1f')}, {_number(high, 100, '.1f')}]"
        f"  U† {_number(s.get('u_dagger'), 1, '.1f')}"
        f"  ppl {_number(s.get('reference_perplexity'), 1, '.2f')}"
        + (f"  prune {prune_s:.0f} s" if prune_s is not None else "")
        + f"  eval {_number(s.get('wall_s'), 1, '.0f')} s  ({outcome.key})"
    )


def _number(value: float | None, scale: float, fmt: str) -> str:
    return "n/a" if value is None else format(scale * value, fmt)
