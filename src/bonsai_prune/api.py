"""The library entry point notebooks call: ``prune(config) -> PruneResult``.

The CLI's ``prune`` command is this function with its arguments parsed.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import io
from .config import PruneConfig
from .data import load_gsm8k, load_problems
from .errors import RunDirectoryError
from .methods import METHODS
from .models import adapter_for, load_model
from .models.adapter import check_supported
from .models.loading import model_type_of
from .pruner import RoundResult, calibration_problems, check_reachable, iterate_rounds
from .utility import build_batch, resolve_utility
from .utility.references import SELF_REFERENCES_FILE, prepare_self_references


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


RUN_ENTRIES = (
    "config.json",
    "report.json",
    "rounds",
    "keep.safetensors",
    io.MODEL_DIR,
    SELF_REFERENCES_FILE,
)


def prepare_out_dir(out: Path, config: PruneConfig, *, resume: bool, overwrite: bool) -> int:
    """Make ``out`` ready for this run; return how many completed rounds it already holds.

    A non-empty directory is refused unless the user resumes (same config) or overwrites;
    overwriting removes only the entries a run writes, nothing else the user keeps there.
    """
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file; give a directory")
    if resume:
        if not (out / "config.json").is_file():
            raise RunDirectoryError(f"--resume: {out} holds no run to resume (no config.json)")
        saved = PruneConfig.from_dict(io.read_json(out / "config.json"))
        if saved != config:
            changed = sorted(k for k, v in saved.to_dict().items() if config.to_dict()[k] != v)
            raise RunDirectoryError(
                f"--resume: {out} was started with different settings ({', '.join(changed)}); "
                "resume with the same command, or use a new --out"
            )
        return io.completed_rounds(out)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirectoryError(
                f"--out {out} is not empty; pass --resume to continue its run or --overwrite to replace it"
            )
        for name in RUN_ENTRIES:
            entry = out / name
            if entry.is_dir():
                shutil.rmtree(entry)
            elif entry.exists():
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return 0


def replay_rounds(out: Path, n_rounds: int, model, adapter) -> list[dict]:
    """Re-apply the saved keep masks of completed rounds: slicing is deterministic, so the
    model ends exactly where the interrupted run stood."""
    figures = []
    for index in range(1, n_rounds + 1):
        tensors, saved = io.load_round(out, index)
        if tensors["keep"].shape[0] != adapter.layout(model).n_units:
            raise RunDirectoryError(
                f"round {index} of {out} does not fit the model; use a new --out"
            )
        adapter.slice(model, tensors["keep"])
        if adapter.count_parameters(model) != saved["params_after"]:
            raise RunDirectoryError(f"replaying round {index} of {out} gave a different model")
        figures.append(saved)
    return figures


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
    resume: continue the run in ``out_dir`` after its last completed round (same config).
    """
    config = config or PruneConfig()
    started = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    pool = load_problems(config.data) if config.data else load_gsm8k("train")
    calibration_problems(pool, config, 1)  # fail now, not after loading, if n is too large
    score = utility if utility is not None else resolve_utility(config.utility)
    done = 0
    if out is not None:
        done = prepare_out_dir(out, config, resume=resume, overwrite=overwrite)
    elif resume:
        raise RunDirectoryError("resume needs the run directory (out_dir)")

    t0 = time.perf_counter()
    if model is None:
        model_type = model_type_of(config.model)
        if model_type is not None:
            check_supported(model_type)  # before spending time on loading the weights
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    load_s = time.perf_counter() - t0
    adapter = adapter_for(model)
    n_original = adapter.count_parameters(model)
    n_total_before = sum(p.numel() for p in model.parameters())
    if config.method == "bonsai":
        check_reachable(adapter, model, config, n_original)
    elif resume:
        raise RunDirectoryError(
            f"--resume applies to Bonsai's rounds; {config.method!r} is one-shot: rerun it with --overwrite"
        )
    device = next(model.parameters()).device
    if config.method == "bonsai":
        # U† with self references: the dense parent's solutions, before any round is replayed
        prepare_self_references(
            score, model, tokenizer, planned_calibration_problems(pool, config), out
        )

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
        "method": config.method,
        "resumed_after_round": done if resume else None,
        "rounds": replay_rounds(out, done, model, adapter) if done else [],
    }
    if out is not None:
        io.atomic_write_json(out / "config.json", config.to_dict())
        io.atomic_write_json(out / "report.json", report)

    rounds: list[RoundResult] = []
    keep_masks: list[torch.Tensor] = []
    if config.method == "bonsai":
        for result in iterate_rounds(
            model, adapter, score, make_batch, config, n_original, start=done + 1, progress=progress
        ):
            rounds.append(result)
            keep_masks.append(result.keep)
            report["rounds"].append(result.figures())
            if out is not None:
                io.save_round(out, result.index, result.tensors(), result.figures())
                io.atomic_write_json(out / "report.json", report)
    else:
        baseline = METHODS.get(config.method)(model, tokenizer, adapter, config, progress=progress)
        report["method_seconds"] = baseline.seconds
        report["method_details"] = baseline.details
        keep_masks.append(baseline.keep)
        if out is not None:
            io.atomic_save_tensors(out / "keep.safetensors", {"keep": baseline.keep})

    n_rounds = len(report["rounds"])
    pruned = n_rounds > 0 or config.method != "bonsai"
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
    if out is not None:
        io.save_model(out, model, tokenizer, adapter.structure(model))
    report["complete"] = True
    if out is not None:
        io.atomic_write_json(out / "report.json", report)
    return PruneResult(model, tokenizer, rounds, report, out, keep_masks)


def planned_calibration_problems(pool, config: PruneConfig) -> list:
    """Every calibration problem the run can use: rounds 1 to ceil(p / f) + 2, and the final
    score's batch after them (a greedy round can fall a little short of its budget)."""
    n_rounds = math.ceil(config.sparsity / config.prune_frac) + 2
    return [p for i in range(1, n_rounds + 2) for p in calibration_problems(pool, config, i)]


def _phase_totals(rounds: list[dict]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for r in rounds:
        for phase, seconds in r["timings"].items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    return totals
