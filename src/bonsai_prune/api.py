"""The library entry point notebooks call: ``prune(config) -> PruneResult``.

It reads as the run does: check the names -> prepare the run directory -> load the model ->
run the registered method (Bonsai or a baseline) -> save the pruned model and the report.
The CLI's ``prune`` command is this function with its arguments parsed.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bonsai_prune.config import PruneConfig, WorkersConfig
from bonsai_prune.core.priors import PRIORS
from bonsai_prune.data.calibration import calibration_problems
from bonsai_prune.data.problems import load_gsm8k, load_problems
from bonsai_prune.errors import RunDirectoryError
from bonsai_prune.methods import METHODS
from bonsai_prune.methods.base import PruneContext
from bonsai_prune.models import load_model
from bonsai_prune.models.adapter import check_supported
from bonsai_prune.models.loading import DTYPES, fast_dtype, model_type_of
from bonsai_prune.models.pruned import save_model
from bonsai_prune.rundir import run as rundir
from bonsai_prune.rundir.files import atomic_save_tensors, atomic_write_json, interrupts_deferred
from bonsai_prune.utility import UTILITIES, resolve_utility
from bonsai_prune.utility.references import prepare_self_references


@dataclass
class PruneResult:
    """The pruned model and what the run measured."""

    model: object
    tokenizer: object
    rounds: list  # the RoundResults run now (iterative methods)
    report: dict
    out_dir: Path | None = None
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # one (U_step,) per step


def library_versions() -> dict[str, str]:
    import sklearn
    import transformers

    from bonsai_prune import __version__

    return {
        "bonsai_prune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def check_registered(config: PruneConfig) -> None:
    """Unknown method, prior or utility names fail before anything is loaded."""
    METHODS.get(config.method)
    PRIORS.get(config.prior)
    UTILITIES.get(config.utility.name)


def prune(
    config: PruneConfig | None = None,
    *,
    utility: Callable | None = None,
    out_dir: str | Path | None = None,
    model=None,
    tokenizer=None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    workers: WorkersConfig | None = None,
) -> PruneResult:
    """Prune ``config.model`` to ``config.sparsity`` with ``config.method`` and return the result.

    utility: a callable ``(model, CalibrationBatch) -> float`` (higher is better) to use
        instead of the named ``config.utility``.
    out_dir: where to write the run directory (model, masks, report); nothing is written if None.
    model, tokenizer: an already loaded model to prune in place (skips loading).
    resume: continue the run in ``out_dir`` after its last completed round (same config).
    workers: score sub-models on local worker processes or a Ray cluster (same result).
    """
    config = config or PruneConfig()
    check_registered(config)
    method = METHODS.get(config.method)
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    pool = load_problems(config.data) if config.data else load_gsm8k("train")
    _calibration(pool, config, 1)  # fail now, not after loading, if n is too large
    score = utility if utility is not None else resolve_utility(config.utility)
    if resume and out is None:
        raise RunDirectoryError("resume needs the run directory (out_dir)")
    if resume and not getattr(method, "resumes", False):
        raise RunDirectoryError(
            f"--resume applies to methods that save their progress; {config.method!r} is one-shot: "
            "rerun it with --overwrite"
        )
    with rundir.locked(out) if out is not None else contextlib.nullcontext():
        return _run(
            config,
            method,
            pool,
            score,
            out,
            model=model,
            tokenizer=tokenizer,
            progress=progress,
            resume=resume,
            overwrite=overwrite,
            started=started,
            workers=workers,
        )


def _run(
    config,
    method,
    pool,
    score,
    out,
    *,
    model,
    tokenizer,
    progress,
    resume,
    overwrite,
    started,
    workers=None,
):
    """The run proper, holding the run directory (if any)."""
    done = rundir.prepare_out_dir(out, config, resume=resume, overwrite=overwrite) if out else 0
    completed = [_saved_round(out, index) for index in range(1, done + 1)] if out else []
    checkpoint = rundir.load_checkpoint(out) if out is not None and resume else None

    t0 = time.perf_counter()
    if model is None:
        model_type = model_type_of(config.model)
        if model_type is not None:
            check_supported(model_type)  # before spending time on loading the weights
        model, tokenizer = load_model(
            config.model, dtype=_run_dtype(config, out, resume), device=config.device
        )
    load_s = time.perf_counter() - t0
    context = PruneContext.create(
        model,
        tokenizer,
        config,
        pool=pool,
        utility=score,
        progress=progress,
        completed_rounds=completed,
        checkpoint=checkpoint,
        workers=workers or WorkersConfig(),
    )
    adapter, make_batch = context.adapter, context.make_batch
    n_original = adapter.count_parameters(model)
    if getattr(method, "uses_utility", False):
        # U† with self references: the dense parent's solutions, before any round is replayed
        prepare_self_references(
            score, model, tokenizer, planned_calibration_problems(pool, config), out
        )

    report = {
        "complete": False,
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": library_versions(),
        "model_load_s": load_s,
        "params_before": n_original,
        "total_params_before": sum(p.numel() for p in model.parameters()),
        "method": config.method,
        "resumed_after_round": done if resume else None,
        "resumed_from_checkpoint": checkpoint is not None,
        "rounds": [figures for _, figures in completed],
        **_dtype_and_device(model),
    }

    def save_round(result) -> None:
        report["rounds"].append(result.figures())
        if out is not None:
            with interrupts_deferred():  # Ctrl-C stops between rounds, never inside one's files
                _start_run_files(out, config, report)
                rundir.save_round(out, result.index, result.tensors(), result.figures())
                atomic_write_json(out / "report.json", report, fault="report")

    context.on_round = save_round

    def save_checkpoint(state: dict) -> None:
        if out is not None:
            with interrupts_deferred():  # Ctrl-C stops between steps, never inside the file
                _start_run_files(out, config, report)
                rundir.save_checkpoint(out, state)

    context.on_checkpoint = save_checkpoint
    result = method(context)
    if not result.round_figures:  # one-shot: its keep mask is the whole record
        report["method_seconds"] = result.seconds
        report["method_details"] = result.details
        if out is not None and result.keep is not None:
            atomic_save_tensors(out / "keep.safetensors", {"keep": result.keep})

    n_rounds = len(report["rounds"])
    pruned = bool(result.keep_masks)
    final_utility = float(score(model, make_batch(n_rounds + 1))) if pruned else None
    n_after = adapter.count_parameters(model)
    report.update(
        {
            "params_after": n_after,
            "total_params_after": sum(p.numel() for p in model.parameters()),
            "sparsity": 1 - n_after / n_original,
            "n_rounds": n_rounds,
            "utility_per_round": [r["utility_before"] for r in report["rounds"]],
            "utility_final": final_utility,
            "phase_seconds": _phase_totals(report["rounds"]),
            "wall_s": time.perf_counter() - started,
            "structure": adapter.structure(model),
        }
    )
    report["complete"] = True
    if out is not None:
        with interrupts_deferred():
            _start_run_files(out, config, {**report, "complete": False})
            save_model(out, model, tokenizer, adapter.structure(model))
            atomic_write_json(out / "report.json", report, fault="report_final")
    return PruneResult(model, tokenizer, result.rounds, report, out, result.keep_masks)


def _run_dtype(config: PruneConfig, out: Path | None, resume: bool) -> str:
    """The dtype to load in: as asked; for ``auto``, what the resumed run used, else what this
    machine computes fast. Recorded in report.json, so a resumed run never switches dtype."""
    if config.dtype != "auto":
        return config.dtype
    if resume and out is not None:
        recorded = rundir.recorded_dtype(out)
        if recorded in DTYPES:
            return recorded
    return fast_dtype(config.device)


def _dtype_and_device(model) -> dict[str, str]:
    """The dtype (fp32, bf16, fp16) and device the model's parameters are actually in."""
    parameter = next(model.parameters())
    names = {dtype: name for name, dtype in DTYPES.items()}
    return {
        "dtype": names.get(parameter.dtype, str(parameter.dtype)),
        "device": str(parameter.device),
    }


def _start_run_files(out: Path, config: PruneConfig, report: dict) -> None:
    """config.json and a report marked incomplete, written once the method has begun for real
    (its own checks passed), so a refused run leaves nothing to --overwrite."""
    if not (out / "config.json").is_file():
        atomic_write_json(out / "config.json", config.to_dict(), fault="config")
        atomic_write_json(out / "report.json", report)


def _calibration(pool, config: PruneConfig, index: int):
    return calibration_problems(pool, config.calib_samples, config.seed, index)


def _saved_round(out: Path, index: int) -> tuple[torch.Tensor, dict]:
    tensors, figures = rundir.load_round(out, index)
    return tensors["keep"], figures


def planned_calibration_problems(pool, config: PruneConfig) -> list:
    """Every calibration problem the run can use: rounds 1 to ceil(p / f) + 2, and the final
    score's batch after them (a greedy round can fall a little short of its budget)."""
    n_rounds = math.ceil(config.sparsity / config.prune_fraction) + 2
    return [p for i in range(1, n_rounds + 2) for p in _calibration(pool, config, i)]


def _phase_totals(rounds: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for r in rounds:
        for phase, seconds in r["timings"].items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return totals
