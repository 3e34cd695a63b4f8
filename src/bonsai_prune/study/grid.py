"""Experiment grids: many pruning runs and their GSM8K evaluations, cached cell by cell.

``load_grid`` reads a YAML grid file, expands it into cells and validates every one before any
work starts, so a typo fails in a second rather than after hours. ``study.runner.run_experiment`` prunes
and evaluates each cell into ``OUT/cells/<key>/`` and skips the cells already complete: a killed
study resumes at its first unfinished cell. :func:`bonsai_prune.study.report.write_report` turns the
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

A cell with ``recover: true`` is also distilled from its dense parent (the grid's top-level
``recover`` mapping holds RecoverConfig fields; default: recover's defaults) and evaluated again:
``cells/<key>/recovered-<hash>/`` holds that run/ and eval/, and the report shows it as a row
"<label> + recovery" (its key, :func:`recovered_key`, is the cell's key plus that folder).

``full_eval: true`` also evaluates, on the whole split (the eval mapping without its limit), the
dense model and, at each sparsity, the finished main model (a prune or a recovery) with the
highest U† (:func:`full_eval_keys`): into ``cells/<key>/eval-full/``. ``report: DIR`` writes
report.md and the plots there instead of ``out``. ``contrast: [LABEL_A, LABEL_B]`` names the two
main methods the question is about (say Bonsai with U† and Bonsai with perplexity): the report's
summary sets them against each other at every sparsity, before and after recovery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from bonsai_prune.api import check_registered
from bonsai_prune.config import EvalConfig, PruneConfig, RecoverConfig, UtilityConfig
from bonsai_prune.errors import ConfigError
from bonsai_prune.methods import METHODS
from bonsai_prune.rundir import files as io

MAIN_GROUP = "main"
DENSE_LABEL = "dense"
TOP_KEYS = ("out", "report", "eval", "base", "recover", "full_eval", "contrast", "cells")
FULL_EVAL_DIR = "eval-full"  # a cell's evaluation on the whole split (full_eval: true)
CELL_KEYS = ("name", "group", "sparsities", "seeds", "recover")  # besides the PruneConfig fields
RECOVER_KEYS = tuple(f.name for f in dataclasses.fields(RecoverConfig))
RECOVERED_SUFFIX = " + recovery"
PRUNE_KEYS = tuple(f.name for f in dataclasses.fields(PruneConfig))
UTILITY_KEYS = tuple(f.name for f in dataclasses.fields(UtilityConfig))
EVAL_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig))
EVAL_FROM_BASE = ("model", "dtype", "device")  # the evaluated model is the one base describes


@dataclass(frozen=True)
class Cell:
    """One pruning run of the grid: cached under ``cells/<key>``, shown as ``label`` in ``group``."""

    key: str
    group: str
    label: str
    prune_config: PruneConfig
    recover: bool = False  # also distil it from its parent and evaluate that


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid file. ``cells`` may repeat a key under other groups."""

    path: str  # as given, for the report's command line
    text: str
    out: Path
    eval_config: EvalConfig  # model, dtype and device taken from base
    dense_key: str
    cells: tuple[Cell, ...]
    recover_config: RecoverConfig = dataclasses.field(default_factory=RecoverConfig)
    full_eval: bool = False  # the dense model and the best main model per sparsity, whole split
    report_dir: Path | None = None  # report.md and plots (default: out)
    contrast: tuple[str, str] | None = None  # two main labels the report's summary compares

    @property
    def full_eval_config(self) -> EvalConfig:
        """The grid's evaluation on the whole split."""
        return dataclasses.replace(self.eval_config, limit=None)

    def unique_cells(self) -> list[Cell]:
        """One cell per key, in file order (the first label and group a key appears under),
        recovered if any of its appearances asks for it."""
        seen: dict[str, Cell] = {}
        for cell in self.cells:
            first = seen.setdefault(cell.key, cell)
            if cell.recover and not first.recover:
                seen[cell.key] = dataclasses.replace(first, recover=True)
        return list(seen.values())

    def report_cells(self) -> list[Cell]:
        """The cells as the report shows them: each recovered cell followed by its recovery."""
        rows = []
        for cell in self.cells:
            rows.append(cell)
            if cell.recover:
                rows.append(
                    dataclasses.replace(
                        cell,
                        key=recovered_key(self, cell.key),
                        label=cell.label + RECOVERED_SUFFIX,
                        recover=False,
                    )
                )
        return rows


@dataclass(frozen=True)
class CellRecord:
    """What the cache holds for one key: each part None until written."""

    key: str
    dense: bool  # the unpruned model's evaluation: nothing to prune
    summary: dict | None  # eval/summary.json
    prune_report: dict | None  # run/report.json
    error: str | None  # error.json of the last failed attempt
    structure: dict | None  # per-layer sizes: the run's, or the dense model's
    full_summary: dict | None = None  # eval-full/summary.json: the whole split (full_eval)

    @property
    def pruned(self) -> bool:
        return bool((self.prune_report or {}).get("complete"))

    @property
    def done(self) -> bool:
        return self.summary is not None and (self.dense or self.pruned)

    @property
    def run_seconds(self) -> float | None:
        """Wall time of the prune call, or of a recovery (the sum of its timed parts)."""
        report = self.prune_report or {}
        if "wall_s" in report:
            return report["wall_s"]
        return sum(report["seconds"].values()) if report.get("seconds") else None


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
    except UnicodeDecodeError:
        raise ConfigError(f"grid file {path} is not valid UTF-8; save it as UTF-8") from None
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
    recover_data = _section(data, "recover")
    _check_keys(recover_data, RECOVER_KEYS, "recover")
    recover_config = _build(RecoverConfig.from_dict, recover_data, "recover")
    out = data.get("out") or "results"
    report_dir = data.get("report")
    for name, value in (("out", out), ("report", report_dir)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"grid file: {name!r} must be a directory path, got {value!r}")
    full_eval = data.get("full_eval", False)
    if not isinstance(full_eval, bool):
        raise ConfigError(f"grid file: 'full_eval' must be true or false, got {full_eval!r}")
    dense = {key: getattr(base, key) for key in EVAL_FROM_BASE} | {"eval": eval_config.to_dict()}
    contrast = _contrast(data.get("contrast"), cells)
    return Grid(
        path=path,
        text=text,
        out=Path(out),
        eval_config=eval_config,
        dense_key=f"{DENSE_LABEL}-{_digest(dense)}",
        cells=tuple(cells),
        recover_config=recover_config,
        full_eval=full_eval,
        report_dir=Path(report_dir) if report_dir else None,
        contrast=contrast,
    )


def _contrast(value, cells: list[Cell]) -> tuple[str, str] | None:
    """The grid's ``contrast``: two different labels of main cells, or None."""
    if value is None:
        return None
    main = list(dict.fromkeys(c.label for c in cells if c.group == MAIN_GROUP))
    if not (isinstance(value, list) and len(value) == 2 and value[0] != value[1]):
        raise ConfigError(
            f"grid file: 'contrast' must list two different method labels, got {value!r}"
        )
    for label in value:
        if label not in main:
            raise ConfigError(
                f"grid file: contrast names {label!r}, which is not a main cell's name; "
                f"use one of {', '.join(map(repr, main))}"
            )
    return value[0], value[1]


def cell_key(config: PruneConfig, eval_config: EvalConfig) -> str:
    """``<method>[-<utility>]-s<sparsity>-seed<seed>-<hash8>``: stable for equal configs."""
    method = config.method + (f"-{config.utility.name}" if scores_submodels(config) else "")
    digest = _digest({"prune": config.identity(), "eval": eval_config.identity()})
    return f"{method}-s{config.sparsity:g}-seed{config.seed}-{digest}"


def recovered_key(grid: Grid, key: str) -> str:
    """``<key>/recovered-<hash8>``: the cell's recovery under the grid's RecoverConfig (a new
    recover mapping is a new folder, never a stale cache hit)."""
    return f"{key}/recovered-{_digest(grid.recover_config.identity())}"


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
    recover = entry.get("recover", False)
    if not isinstance(recover, bool):
        raise ConfigError(f"{where}: 'recover' must be true or false, got {recover!r}")
    cells = []
    for sparsity in sparsities:
        for seed in seeds:
            values = base.to_dict() | overrides | {"sparsity": sparsity, "seed": seed}
            config = _build(PruneConfig.from_dict, values, where)
            _check_registered(config, where)
            label = str(name) if name else _default_label(config)
            cells.append(Cell(cell_key(config, eval_config), group, label, config, recover))
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
    """Unknown method, prior or utility names fail now, not when the cell's turn comes."""
    try:
        check_registered(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _default_label(config: PruneConfig) -> str:
    return f"{config.method}+{config.utility.name}" if scores_submodels(config) else config.method


def scores_submodels(config: PruneConfig) -> bool:
    """Whether the cell's method scores sub-models with ``config.utility`` (so it names it)."""
    return getattr(METHODS.get(config.method), "uses_utility", False)


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


def read_records(grid: Grid) -> dict[str, CellRecord]:
    """key -> :func:`read_cell` for the dense model and every cell the report shows."""
    keys = dict.fromkeys([grid.dense_key, *(c.key for c in grid.report_cells())])
    return {key: read_cell(grid, key) for key in keys}


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
        full_summary=optional(folder / FULL_EVAL_DIR / "summary.json"),
    )


def full_eval_keys(grid: Grid, records: dict[str, CellRecord]) -> list[str]:
    """The keys ``full_eval`` evaluates on the whole split: the dense model's, then
    :func:`best_main_keys` by sparsity. A model that was once the best keeps its whole-split
    evaluation in the cache when a better one lands."""
    best = best_main_keys(grid, records)
    return [grid.dense_key, *(best[s] for s in sorted(best))]


def settled_best_keys(grid: Grid, records: dict[str, CellRecord]) -> dict[float, str]:
    """:func:`best_main_keys` at the sparsities whose every main cell and recovery has
    finished: their best is final, so its whole-split evaluation need not wait for the rest of
    the grid (a study that runs out of time still has it)."""
    pending = {
        cell.prune_config.sparsity
        for cell in grid.report_cells()
        if cell.group == MAIN_GROUP and not (records.get(cell.key) and records[cell.key].done)
    }
    return {s: key for s, key in best_main_keys(grid, records).items() if s not in pending}


def best_main_keys(grid: Grid, records: dict[str, CellRecord]) -> dict[float, str]:
    """sparsity -> the finished main-group model (prune or recovery) with the highest U† on the
    grid's problems. U† picks because accuracy at this scale is a few percent and ties."""
    best: dict[float, tuple[float, str]] = {}
    for cell in grid.report_cells():
        record = records.get(cell.key)
        if cell.group != MAIN_GROUP or record is None or not record.done:
            continue
        score = record.summary.get("u_dagger")
        sparsity = cell.prune_config.sparsity
        if score is not None and (sparsity not in best or score > best[sparsity][0]):
            best[sparsity] = (score, cell.key)
    return {sparsity: key for sparsity, (_, key) in sorted(best.items())}
