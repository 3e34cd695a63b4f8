"""Experiment grids: many pruning runs and their GSM8K evaluations, cached cell by cell.

``load_grid`` reads a YAML grid file, expands it into cells and validates every one before any
work starts, so a typo fails in a second rather than after hours. ``run_experiment`` prunes and
evaluates each cell into ``OUT/cells/<key>/`` and skips the cells already complete: a killed
study resumes at its first unfinished cell. :func:`bonsai_prune.report.write_report` turns the
cache into ``OUT/report.md`` and plots. Grid file (``out`` is relative to the working directory)::

    out: results/
    eval: {limit: 64, max_new_tokens: 192}          # EvalConfig fields (model comes from base)
    base: {masks_per_round: 16, utility: {name: perplexity}}          # PruneConfig fields
    cells:
      - {method: wanda, sparsities: [0.2, 0.35]}
      - {name: acc-only, group: "ablation: weights", method: bonsai, sparsity: 0.35,
         utility: {name: comprehensive, weights: {acc: 100}}}

A cell's ``utility`` is merged into the base's field by field (``weights`` is replaced whole).
The key of a cell is a readable prefix plus a hash of its PruneConfig and the EvalConfig, so
cells that describe the same run (say the main cell and the ablation's reference) share one
cache entry and run once. Cell directory::

    cells/<key>/cell.json     what the cell is        cells/<key>/run/   the prune run (io.py)
    cells/<key>/eval/         summary.json, generations.jsonl
    cells/<key>/error.json    the BonsaiPruneError of a failed attempt (retried next time)
    cells/dense-<hash>/       the unpruned model's evaluation and structure.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from . import io
from .api import prune
from .config import PruneConfig, UtilityConfig
from .errors import BonsaiPruneError, ConfigError
from .evaluate import EvalConfig, evaluate
from .models.adapter import adapter_for
from .models.loading import load_model, resolve_dtype

MAIN_GROUP = "main"
DENSE_LABEL = "dense"
TOP_KEYS = ("out", "eval", "base", "cells")
CELL_KEYS = ("name", "group", "sparsities", "seeds")  # besides the PruneConfig fields
PRUNE_KEYS = tuple(f.name for f in dataclasses.fields(PruneConfig))
UTILITY_KEYS = tuple(f.name for f in dataclasses.fields(UtilityConfig))
EVAL_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))
EVAL_FROM_BASE = ("model", "dtype", "device")  # the evaluated model is the one base describes

Loader = Callable[..., tuple]  # (spec, *, dtype, device) -> (model, tokenizer), like load_model


@dataclass(frozen=True)
class Cell:
    """One pruning run of the grid: cached under ``cells/<key>``, shown as ``label`` in ``group``."""

    key: str
    group: str
    label: str
    prune_config: PruneConfig


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid file. ``cells`` may repeat a key under other groups."""

    path: str  # as given, for the report's command line
    text: str
    out: Path
    eval_config: EvalConfig  # model, dtype and device taken from base
    dense_key: str
    cells: tuple[Cell, ...]

    def unique_cells(self) -> list[Cell]:
        """One cell per key, in file order (the first label and group a key appears under)."""
        seen: dict[str, Cell] = {}
        for cell in self.cells:
            seen.setdefault(cell.key, cell)
        return list(seen.values())


@dataclass(frozen=True)
class CellRecord:
    """What the cache holds for one key: each part None until written."""

    key: str
    dense: bool  # the unpruned model's evaluation: nothing to prune
    summary: dict | None  # eval/summary.json
    prune_report: dict | None  # run/report.json
    error: str | None  # error.json of the last failed attempt
    structure: dict | None  # per-layer sizes: the run's, or the dense model's

    @property
    def pruned(self) -> bool:
        return bool((self.prune_report or {}).get("complete"))

    @property
    def done(self) -> bool:
        return self.summary is not None and (self.dense or self.pruned)


@dataclass(frozen=True)
class CellOutcome:
    """What ``run_experiment`` did with one key: "ran", "cached" or "failed"."""

    key: str
    label: str
    status: str
    seconds: float  # spent in this call
    error: str | None = None


@dataclass
class ExperimentResult:
    """What one ``run_experiment`` call did; the figures themselves stay in the cache."""

    grid: Grid
    outcomes: list[CellOutcome]  # the dense evaluation first
    wall_s: float
    report_path: Path | None = None

    @property
    def n_failed(self) -> int:
        return sum(o.status == "failed" for o in self.outcomes)


# ---- the grid file -----------------------------------------------------------------------------


def load_grid(path: str | Path) -> Grid:
    """Read, expand and validate a grid file; raises ConfigError naming the cell and key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read grid file {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"grid file {path} is not valid YAML: {' '.join(str(e).split())}"
        ) from None
    return parse_grid(data, path=str(path), text=text)


def parse_grid(data, *, path: str = "<grid>", text: str = "") -> Grid:
    """Expand the mapping a grid file holds into cells (see the module docstring)."""
    _check_keys(data, TOP_KEYS, "grid file")
    base_data = _section(data, "base")
    _check_keys(base_data, PRUNE_KEYS, "base")
    _check_keys(base_data.get("utility", {}), UTILITY_KEYS, "base.utility")
    base = _build(PruneConfig.from_dict, base_data, "base")
    eval_data = _section(data, "eval")
    _check_keys(eval_data, EVAL_KEYS, "eval")
    for key in EVAL_FROM_BASE:
        if key in eval_data:
            raise ConfigError(f"eval: {key!r} is taken from base (the pruned model is evaluated)")
    fixed = {key: getattr(base, key) for key in EVAL_FROM_BASE}
    eval_config = _build(EvalConfig.from_dict, {**eval_data, **fixed}, "eval")
    entries = data.get("cells")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("grid file: 'cells' must be a non-empty list of cells")
    cells = []
    for index, entry in enumerate(entries):
        cells.extend(_expand(entry, index, base, eval_config))
    _check_duplicates(cells)
    out = data.get("out") or "results"
    if not isinstance(out, str):
        raise ConfigError(f"grid file: 'out' must be a directory path, got {out!r}")
    dense = {key: getattr(base, key) for key in EVAL_FROM_BASE} | {"eval": eval_config.to_dict()}
    return Grid(
        path=path,
        text=text,
        out=Path(out),
        eval_config=eval_config,
        dense_key=f"{DENSE_LABEL}-{_digest(dense)}",
        cells=tuple(cells),
    )


def cell_key(config: PruneConfig, eval_config: EvalConfig) -> str:
    """``<method>[-<utility>]-s<sparsity>-seed<seed>-<hash8>``: stable for equal configs."""
    method = config.method + (f"-{config.utility.name}" if config.method == "bonsai" else "")
    digest = _digest({"prune": config.to_dict(), "eval": eval_config.to_dict()})
    return f"{method}-s{config.sparsity:g}-seed{config.seed}-{digest}"


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _section(data: dict, name: str) -> dict:
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"grid file: {name!r} must be a mapping of fields, got {section!r}")
    return section


def _check_keys(data, known: Sequence[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {data!r}")
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(known)}")


def _build(make: Callable, data: dict, where: str):
    """``make(data)`` with any ConfigError (or a wrong type) prefixed by ``where``."""
    try:
        return make(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:  # e.g. a list where a number belongs
        raise ConfigError(f"{where}: {e}") from None


def _expand(entry, index: int, base: PruneConfig, eval_config: EvalConfig) -> list[Cell]:
    """The cells of one ``cells`` entry: one per sparsity x seed."""
    name = entry.get("name") if isinstance(entry, dict) else None
    where = f"cells[{index}]" + (f" ({name})" if name else "")
    _check_keys(entry, (*CELL_KEYS, *PRUNE_KEYS), where)
    if "model" in entry:
        raise ConfigError(f"{where}: 'model' is set once, in base (every cell is compared with it)")
    _check_keys(entry.get("utility", {}), UTILITY_KEYS, f"{where} utility")
    sparsities = _values(entry, "sparsities", "sparsity", base.sparsity, where)
    seeds = _values(entry, "seeds", "seed", base.seed, where)
    overrides = {
        k: v for k, v in entry.items() if k in PRUNE_KEYS and k not in ("sparsity", "seed")
    }
    overrides["utility"] = base.utility.to_dict() | entry.get("utility", {})
    group = str(entry.get("group") or MAIN_GROUP)
    cells = []
    for sparsity in sparsities:
        for seed in seeds:
            values = base.to_dict() | overrides | {"sparsity": sparsity, "seed": seed}
            config = _build(PruneConfig.from_dict, values, where)
            _check_registered(config, where)
            label = str(name) if name else _default_label(config)
            cells.append(Cell(cell_key(config, eval_config), group, label, config))
    return cells


def _values(entry: dict, many: str, one: str, default, where: str) -> list:
    if many in entry and one in entry:
        raise ConfigError(f"{where}: give {one!r} or {many!r}, not both")
    if many not in entry:
        return [entry.get(one, default)]
    values = entry[many]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {many!r} must be a non-empty list, got {values!r}")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"{where}: {many!r} repeats a value: {values!r}")
    return values


def _check_registered(config: PruneConfig, where: str) -> None:
    """Unknown prior or utility names fail now, not when the cell's turn comes."""
    from .priors import PRIORS
    from .utility import UTILITIES

    try:
        PRIORS.get(config.prior)
        UTILITIES.get(config.utility.name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _default_label(config: PruneConfig) -> str:
    return f"bonsai+{config.utility.name}" if config.method == "bonsai" else config.method


def _check_duplicates(cells: list[Cell]) -> None:
    """Two cells of one group must differ in run and in (label, sparsity, seed)."""
    runs: dict[tuple, Cell] = {}
    rows: dict[tuple, Cell] = {}
    for cell in cells:
        c = cell.prune_config
        row = (cell.group, cell.label, c.sparsity, c.seed)
        if (cell.group, cell.key) in runs:
            other = runs[(cell.group, cell.key)]
            raise ConfigError(
                f"cells {other.label!r} and {cell.label!r} in group {cell.group!r} are the same "
                f"run (sparsity {c.sparsity}, seed {c.seed}); remove one"
            )
        if row in rows:
            raise ConfigError(
                f"group {cell.group!r} has two different cells named {cell.label!r} at sparsity "
                f"{c.sparsity}, seed {c.seed}; give them different names"
            )
        runs[(cell.group, cell.key)] = rows[row] = cell


# ---- the cache ---------------------------------------------------------------------------------


def cell_dir(grid: Grid, key: str) -> Path:
    """``OUT/cells/<key>``: where one cell (or the dense evaluation) is cached."""
    return grid.out / "cells" / key


def read_cell(grid: Grid, key: str) -> CellRecord:
    """What the cache holds for ``key`` (nothing is loaded but JSON)."""
    folder = cell_dir(grid, key)

    def optional(path: Path) -> dict | None:
        return io.read_json(path) if path.is_file() else None

    report = optional(folder / "run" / "report.json")
    structure = (report or {}).get("structure") or optional(folder / "structure.json")
    error = optional(folder / "error.json")
    return CellRecord(
        key=key,
        dense=key == grid.dense_key,
        summary=optional(folder / "eval" / "summary.json"),
        prune_report=report,
        error=error["error"] if error else None,
        structure=structure,
    )


# ---- running -----------------------------------------------------------------------------------


def run_experiment(
    grid_path: str | Path,
    *,
    progress: bool = True,
    only: str | Sequence[str] | None = None,
    load: Loader | None = None,
    write_report: bool = True,
) -> ExperimentResult:
    """Prune and evaluate every cell of a grid file not already in its cache, then report.

    progress: tqdm bars inside each prune and evaluation (one line per cell is always printed).
    only: run just the cells whose name (label), group or key is one of these; the dense
        evaluation always runs, and the report shows every cell the cache holds.
    load: ``(spec, *, dtype, device) -> (model, tokenizer)``; default :func:`load_model`
        (tests pass a tiny model here).
    write_report: write OUT/report.md and the plots at the end.
    """
    began = time.perf_counter()
    grid = load_grid(grid_path)
    load = load or load_model
    cells = _select(grid, only)
    print(f"experiment {grid.path}: {len(cells)} cell(s) + dense -> {grid.out}", flush=True)
    outcomes = [_run_dense(grid, load, progress)]
    print(f"[dense] {_cell_line(grid, None, outcomes[0])}", flush=True)
    for number, cell in enumerate(cells, start=1):
        outcome = _run_cell(grid, cell, load, progress)
        outcomes.append(outcome)
        print(f"[{number}/{len(cells)}] {_cell_line(grid, cell, outcome)}", flush=True)
    result = ExperimentResult(grid, outcomes, time.perf_counter() - began)
    if write_report:
        from .report import write_report as write

        result.report_path = write(result)
        print(f"report: {result.report_path}", flush=True)
    return result


def _select(grid: Grid, only: str | Sequence[str] | None) -> list[Cell]:
    cells = grid.unique_cells()
    if only is None:
        return cells
    wanted = {only} if isinstance(only, str) else set(only)
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


def _run_cell(grid: Grid, cell: Cell, load: Loader, progress: bool) -> CellOutcome:
    """Prune (or resume, or reload a finished prune) and evaluate one cell."""
    folder, config = cell_dir(grid, cell.key), cell.prune_config
    record = read_cell(grid, cell.key)
    if record.done:
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
        if (record.prune_report or {}).get("complete") and io.is_pruned_dir(run):
            model, tokenizer = io.load_pruned(run, device=config.device)  # only the eval was lost
            model = model.to(resolve_dtype(config.dtype, config.device))
        else:
            model, tokenizer = load(config.model, dtype=config.dtype, device=config.device)
            resume = config.method == "bonsai" and (run / "config.json").is_file()
            pruned = prune(
                config,
                model=model,
                tokenizer=tokenizer,
                out_dir=run,
                progress=progress,
                resume=resume,
                overwrite=not resume,
            )
            model = pruned.model
        labelled = replace(grid.eval_config, model=str(run))  # sizes the files on disk
        evaluate(
            labelled, model=model, tokenizer=tokenizer, out_dir=folder / "eval", progress=progress
        )
    except BonsaiPruneError as e:
        return _failed(folder, cell.key, cell.label, e, began)
    (folder / "error.json").unlink(missing_ok=True)
    return CellOutcome(cell.key, cell.label, "ran", time.perf_counter() - began)


def _failed(folder: Path, key: str, label: str, error: Exception, began: float) -> CellOutcome:
    message = f"{type(error).__name__}: {error}"
    io.atomic_write_json(folder / "error.json", {"error": message})
    return CellOutcome(key, label, "failed", time.perf_counter() - began, message)


def _cell_line(grid: Grid, cell: Cell | None, outcome: CellOutcome) -> str:
    """One line per finished cell: what it is, then its headline figures or why it failed."""
    what = (
        DENSE_LABEL
        if cell is None
        else (f"{cell.label} s={cell.prune_config.sparsity:g} seed={cell.prune_config.seed}")
    )
    if outcome.status == "failed":
        return f"{what}: FAILED {outcome.error}"
    if outcome.status == "cached":
        return f"{what}: cached ({outcome.key})"
    record = read_cell(grid, outcome.key)
    s = record.summary or {}
    low, high = s.get("accuracy_strict_ci") or (None, None)
    prune_s = (record.prune_report or {}).get("wall_s")
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
