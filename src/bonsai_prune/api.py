"""The library entry point notebooks call: ``prune(config) -> PruneResult``.

The CLI's ``prune`` command is this function with its arguments parsed.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import io
from .config import PruneConfig
from .data import load_gsm8k, load_problems
from .errors import RunDirectoryError
from .models import adapter_for, load_model
from .pruner import RoundResult, calibration_problems, check_reachable, iterate_rounds
from .utility import build_batch, resolve_utility


@dataclass
class PruneResult:
    """The pruned model and what the run measured."""

    model: object
    tokenizer: object
    rounds: list[RoundResult]
    report: dict
    out_dir: Path | None = None
    keep_masks: list[torch.Tensor] = field(default_factory=list)  # one (U_round,) per round


def library_versions() -> dict[str, str]:
    import sklearn
    import transformers

    from . import __version__

    return {
        "bonsai_prune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
        "python": platform.python_version(),
    }


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a directory that holds something else."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise RunDirectoryError(
            f"--out {out} is not empty; pass --resume to continue its run or --overwrite to replace it"
        )
    out.mkdir(parents=True, exist_ok=True)


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
) -> PruneResult:
    """Prune ``config.model`` to ``config.sparsity`` with Bonsai and return the result.

    utility: a callable ``(model, CalibrationBatch) -> float`` (higher is better) to use
        instead of the named ``config.utility``.
    out_dir: where to write the run directory (model, masks, report); nothing is written if None.
    model, tokenizer: an already loaded model to prune in place (skips loading).
    """
    config = config or PruneConfig()
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        prepare_out_dir(out, resume=resume, overwrite=overwrite)
    pool = load_problems(config.data) if config.data else load_gsm8k("train")
    calibration_problems(pool, config, 1)  # fail now, not after loading, if n is too large
    score = utility if utility is not None else resolve_utility(config.utility)

    t0 = time.perf_counter()
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    load_s = time.perf_counter() - t0
    adapter = adapter_for(model)
    n_original = adapter.count_parameters(model)
    n_total_before = sum(p.numel() for p in model.parameters())
    check_reachable(adapter, model, config, n_original)
    device = next(model.parameters()).device

    def make_batch(index: int):
        problems = calibration_problems(pool, config, index)
        u = config.utility
        return build_batch(
            tokenizer,
            problems,
            prompt=u.prompt,
            shots=u.shots,
            max_length=u.max_length,
            device=device,
        )

    report = {
        "complete": False,
        "config": config.to_dict(),
        "seed": config.seed,
        "versions": library_versions(),
        "model_load_s": load_s,
        "params_before": n_original,
        "total_params_before": n_total_before,
        "rounds": [],
    }
    if out is not None:
        io.atomic_write_json(out / "config.json", config.to_dict())
        io.atomic_write_json(out / "report.json", report)

    rounds: list[RoundResult] = []
    for result in iterate_rounds(
        model, adapter, score, make_batch, config, n_original, progress=progress
    ):
        rounds.append(result)
        report["rounds"].append(result.figures())
        if out is not None:
            io.save_round(out, result.index, result.tensors(), result.figures())
            io.atomic_write_json(out / "report.json", report)

    final_utility = float(score(model, make_batch(len(rounds) + 1))) if rounds else None
    n_after = adapter.count_parameters(model)
    report.update(
        {
            "params_after": n_after,
            "total_params_after": sum(p.numel() for p in model.parameters()),
            "sparsity": 1 - n_after / n_original,
            "n_rounds": len(rounds),
            "utility_per_round": [r.utility_before for r in rounds],
            "utility_final": final_utility,
            "phase_seconds": _phase_totals(rounds),
            "wall_s": time.perf_counter() - started,
            "structure": adapter.structure(model),
        }
    )
    if out is not None:
        io.save_model(out, model, tokenizer, adapter.structure(model))
    report["complete"] = True
    if out is not None:
        io.atomic_write_json(out / "report.json", report)
    return PruneResult(model, tokenizer, rounds, report, out, [r.keep for r in rounds])


def _phase_totals(rounds: list[RoundResult]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for r in rounds:
        for phase, seconds in r.timings.items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return totals
