"""Putting back the weights of a finished model the cache no longer holds, and proving they are
the weights that were measured.

The cache keeps a cell's figures, not its weights (``.gitignore``: they are hundreds of MB), so a
fresh checkout can report every cell but cannot evaluate one again: the whole-split evaluation
of a sparsity's best model (``full_eval``) would have nothing to load. :func:`restore_weights`
prunes the cell again from its cached configuration (and, for a recovery, distils it again)
in a scratch folder, ``<cell>/rebuild/``, and moves the weights into the cached run only when
the rebuild reproduces what the cache recorded: the same kept widths in every layer and the
same final utility for the prune, the same held-out KL for the recovery. A rebuild that differs
raises :class:`~bonsai_prune.errors.DataError`, so no figure is ever reported for a model other
than the one the study measured. Both steps resume (a prune at its first unfinished round, a
recovery at its last checkpoint), as the grid's own cells do.

After the whole-split evaluation, :func:`agreement` compares it row by row with the cell's
evaluation on the grid's problems, which are the split's first rows, and writes the comparison
beside it: the teacher-forced reference NLL of one model agrees per problem to a few hundredths
of a nat in bf16 (other batch companions, other sums), while its greedy texts may part.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from bonsai_prune.api import PruneResult, prune
from bonsai_prune.config import PruneConfig
from bonsai_prune.errors import DataError, RunDirectoryError
from bonsai_prune.methods import METHODS
from bonsai_prune.models.pruned import MODEL_DIR, is_pruned_dir
from bonsai_prune.recover import recover
from bonsai_prune.rundir import files as io
from bonsai_prune.study.figures import per_problem, repeat_figures
from bonsai_prune.study.grid import (
    FULL_EVAL_DIR,
    Cell,
    Grid,
    cell_dir,
    read_cell,
    recovered_key,
)

REBUILD_DIR = "rebuild"  # <cell>/rebuild/: the scratch prune and recovery (not kept in git)
UTILITY_RTOL = 1e-4  # the same sub-network gives the same utility up to summation order
KL_RTOL = 1e-2  # a distillation repeated on the same data: bf16 sums in another order drift
AGREEMENT_FILE = "agreement.json"  # eval-full/agreement.json: rows shared with eval/

Loader = Callable[..., tuple]


def owner(grid: Grid, key: str) -> tuple[Cell, bool]:
    """``(cell, recovered)``: the grid cell whose prune (or whose recovery) is ``key``."""
    for cell in grid.unique_cells():
        if key == cell.key:
            return cell, False
        if cell.recover and key == recovered_key(grid, cell.key):
            return cell, True
    raise RunDirectoryError(f"{key} is no cell of {grid.path}; it cannot be rebuilt")


def restore_weights(grid: Grid, key: str, load: Loader, progress: bool = True) -> Iterator[str]:
    """Rebuild the weights of the finished model ``key`` (and of its pruned parent, for a
    recovery) where the cache lacks them, saying after each step what was rebuilt and how it
    matched (a generator: a recovery that fails still leaves its parent's line said)."""
    cell, recovered = owner(grid, key)
    run, parent = cell_dir(grid, key) / "run", cell_dir(grid, cell.key) / "run"
    if is_pruned_dir(run):
        return
    if not is_pruned_dir(parent):
        yield _rebuild_prune(cell, parent, load, progress)
    if recovered:
        yield _rebuild_recovery(grid, parent, run, progress)


def _rebuild_prune(cell: Cell, run: Path, load: Loader, progress: bool) -> str:
    config = cell.prune_config
    cached = _cached_report(run)
    scratch = run.parent / REBUILD_DIR / "run"
    rebuilt = prune_resuming(config, scratch, load, progress).report
    if rebuilt.get("structure") != cached.get("structure"):
        raise DataError(
            f"{run.parent.name}: the rebuilt prune kept other widths than the cached one "
            f"(the saved structure differs); its scratch run is in {scratch}"
        )
    before, after = cached.get("utility_final"), rebuilt.get("utility_final")
    if before is not None and not _close(before, after, UTILITY_RTOL):
        raise DataError(
            f"{run.parent.name}: the rebuilt prune's final utility is {after}, the cached "
            f"one's {before}; its scratch run is in {scratch}"
        )
    _move_model(scratch, run)
    return f"prune rebuilt: same widths in every layer, final utility {after} (cached {before})"


def prune_resuming(
    config: PruneConfig, run: Path, load: Loader, progress: bool, fresh: bool = False
) -> PruneResult:
    """Prune ``config``'s model into ``run``, resuming a killed run of a method that can (at
    its first unfinished round) unless ``fresh``."""
    model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
    resume = (
        not fresh
        and getattr(METHODS.get(config.method), "resumes", False)
        and (run / "config.json").is_file()
    )
    return prune(
        config,
        model=model,
        tokenizer=tokenizer,
        out_dir=run,
        progress=progress,
        resume=resume,
        overwrite=not resume,
    )


def _rebuild_recovery(grid: Grid, parent: Path, run: Path, progress: bool) -> str:
    cached = _cached_report(run)
    scratch = run.parent / REBUILD_DIR / "run"
    started = (scratch / "report.json").is_file()
    rebuilt = recover(
        parent,
        scratch,
        grid.recover_config,
        resume=started,
        overwrite=not started,
        progress=progress,
    ).report
    before = (cached.get("best") or {}).get("kl")
    after = (rebuilt.get("best") or {}).get("kl")
    if before is None or not _close(before, after, KL_RTOL):
        raise DataError(
            f"{run.parent.name}: the rebuilt recovery's held-out KL is {after}, the cached "
            f"one's {before} (tolerance {KL_RTOL:.0%}); its scratch run is in {scratch}"
        )
    _move_model(scratch, run)
    return f"recovery rebuilt: held-out KL {after:.4f} (cached {before:.4f})"


def _cached_report(run: Path) -> dict:
    if not (run / "report.json").is_file():
        raise RunDirectoryError(f"{run} has no report.json: there is nothing to rebuild against")
    return io.read_json(run / "report.json")


def _move_model(scratch: Path, run: Path) -> None:
    """The rebuilt weights into the cached run; its figures and configuration stay as they
    were measured."""
    shutil.rmtree(run / MODEL_DIR, ignore_errors=True)
    shutil.move(str(scratch / MODEL_DIR), str(run / MODEL_DIR))


def _close(a: float, b: float | None, rtol: float) -> bool:
    return b is not None and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def agreement(grid: Grid, key: str) -> dict | None:
    """:func:`~bonsai_prune.study.figures.repeat_figures` of ``key``'s evaluation on the grid's
    problems and on the whole split, which starts with them; written to
    ``eval-full/agreement.json``. None when either evaluation is missing."""
    record = read_cell(grid, key)
    first, whole = per_problem(grid, record), per_problem(grid, record, FULL_EVAL_DIR)
    if first is None or whole is None:
        return None
    result = repeat_figures(first, whole)
    io.atomic_write_json(cell_dir(grid, key) / FULL_EVAL_DIR / AGREEMENT_FILE, result)
    return result
