"""Recovery after pruning: distil the pruned model from its dense parent on GSM8K train.

``recover(run_dir, out_dir, config)`` reads a pruned run directory, trains its remaining weights
(or LoRA adapters, merged at the end) to match the parent's next-token distributions on
solution tokens, and writes a run directory with the same model format (``load_pruned``).

Output layout::

    OUT/
      config.json           the parent run's PruneConfig (``model`` still names the dense parent)
      recover_config.json   the RecoverConfig
      report.json           figures; "complete": true only once model/ is written
      self_data.jsonl       the parent's greedy train solutions (data "self"/"both"), reused on resume
      checkpoints/          last.safetensors (resumable), best.safetensors; removed when complete
      model/                the recovered pruned model, written last (atomic rename)

Minitron (arXiv 2407.14679) and self-data distillation (arXiv 2410.09982) are the recipes.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bonsai_prune.config import RecoverConfig
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.errors import MemoryBudgetError, ModelLoadError, RunDirectoryError
from bonsai_prune.memory import available_memory
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.loading import cache_dir, packaged_gguf, resolve_dtype
from bonsai_prune.models.pruned import (
    MODEL_DIR,
    STRUCTURE_FILE,
    is_pruned_dir,
    load_pruned,
    save_model,
)
from bonsai_prune.recover.data import (
    collate,
    gold_sequences,
    plan_batches,
    self_sequences,
    shared_self_cache,
    split_held_out,
)
from bonsai_prune.recover.step_memory import probe_step_memory, rows_that_fit
from bonsai_prune.recover.trainer import TrainState, train
from bonsai_prune.rundir.files import atomic_write_json, read_json

__all__ = ["RecoverConfig", "RecoverResult", "recover"]

RECOVER_CONFIG = "recover_config.json"


@dataclass
class RecoverResult:
    """The recovered model (None when stopped early) and what the run measured."""

    model: object
    tokenizer: object
    report: dict
    out_dir: Path
    complete: bool


def _teacher_identity(spec: str) -> str:
    """What names the teacher in the shared solutions cache: the packaged GGUF by name and
    size (its de-quantised copy is remade with a new time on a fresh machine, and must still
    find the solutions kept from before), any other spec as given (a folder by its files)."""
    if spec != "default":
        return spec
    gguf = packaged_gguf()
    return f"default:{gguf.name}:{gguf.stat().st_size}"


@dataclass
class Pair:
    """A pruned student ready to train and its frozen teacher."""

    student: torch.nn.Module  # fp32 master weights, whatever dtype it was saved in
    tokenizer: object
    teacher: torch.nn.Module  # in the config's dtype, eval mode, no gradients
    autocast: torch.dtype | None  # the student's compute dtype (None: fp32, no autocast)
    saved_dtype: torch.dtype  # the dtype the recovered student is saved in


def load_pair(run_dir: str | Path, teacher_spec: str, config: RecoverConfig) -> Pair:
    """The student in ``run_dir`` and the teacher ``teacher_spec``, as ``recover`` trains them
    (a teacher with another tokenizer is refused)."""
    student, tokenizer = load_pruned(run_dir)
    saved_dtype = student.dtype
    student = student.float()  # before the teacher loads: the saved-dtype copy is freed first
    compute = resolve_dtype(config.dtype)
    teacher, teacher_tok = load_model(teacher_spec, dtype=config.dtype)
    _check_same_tokenizer(tokenizer, teacher_tok, teacher_spec)
    teacher.eval().requires_grad_(False)
    autocast = compute if compute != torch.float32 else None
    return Pair(student, tokenizer, teacher, autocast, saved_dtype)


def recover(
    run_dir: str | Path,
    out_dir: str | Path,
    config: RecoverConfig | None = None,
    *,
    teacher: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after_step: int | None = None,
    progress: bool = True,
) -> RecoverResult:
    """Distil the pruned model in ``run_dir`` from its dense parent into ``out_dir``.

    teacher: model spec of the parent; default: the ``model`` in run_dir/config.json.
    resume: continue the run in ``out_dir`` from its last checkpoint (same config required).
    stop_after_step: checkpoint and return after this step, as a killed run would leave it
        (for time-sliced machines and tests); resume later with ``resume=True``.
    """
    config = config or RecoverConfig()
    run_dir, out = Path(run_dir), Path(out_dir)
    if not is_pruned_dir(run_dir):
        raise RunDirectoryError(f"{run_dir} holds no pruned model (no model/{STRUCTURE_FILE})")
    parent_config = (
        read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    )
    teacher_spec = teacher or parent_config.get("model")
    if not teacher_spec:
        raise RunDirectoryError(f"{run_dir}/config.json names no parent model; pass teacher=")
    started, cpu_started = time.perf_counter(), time.process_time()
    pair = load_pair(run_dir, teacher_spec, config)
    student, tokenizer, teacher_model = pair.student, pair.tokenizer, pair.teacher
    autocast = pair.autocast
    compute = autocast or torch.float32
    # before anything is written or generated: a step that cannot fit is refused first
    micro_batch = _micro_batch_size(student, teacher_model.dtype, config, autocast, progress)
    _prepare_out(out, run_dir, config, resume=resume, overwrite=overwrite)

    train_problems, held_out = split_held_out(load_gsm8k("train"), config.n_eval, config.seed)
    t0 = time.perf_counter()
    shared = shared_self_cache(
        cache_dir() / "self_data",
        _teacher_identity(teacher_spec),
        config.prompt,
        config.self_max_new_tokens,
        str(teacher_model.dtype),
    )
    sequences = _training_sequences(
        teacher_model, tokenizer, train_problems, config, out, progress, shared
    )
    data_seconds = time.perf_counter() - t0
    plan = plan_batches(
        [len(s.ids) for s in sequences], config.batch_size, config.max_tokens, config.seed
    )
    held = gold_sequences(tokenizer, held_out, config.prompt, config.max_length)
    eval_batches = [
        collate(held[i : i + config.batch_size], tokenizer.pad_token_id)
        for i in range(0, len(held), config.batch_size)
    ]
    if config.train == "lora":
        student = _wrap_lora(student, config)

    report = {
        "complete": False,
        "parent_run": str(run_dir),
        "teacher": teacher_spec,
        "config": config.to_dict(),
        "n_steps": len(plan),
        "n_sequences": len(sequences),
        "compute_dtype": str(compute).removeprefix("torch."),
        "micro_batch_size_used": micro_batch,
        "threads": torch.get_num_threads(),
    }

    def write_progress(state: TrainState) -> None:
        atomic_write_json(out / "report.json", {**report, **_figures(state)})

    state = train(
        student,
        teacher_model,
        sequences,
        plan,
        eval_batches,
        replace(config, micro_batch_size=micro_batch),
        pad_id=tokenizer.pad_token_id,
        ckpt_dir=out / "checkpoints",
        autocast_dtype=autocast,
        stop_after_step=stop_after_step,
        on_checkpoint=write_progress,
        progress=progress,
    )
    report.update(_figures(state))
    report["seconds"]["self_data"] = data_seconds
    if state.step < len(plan):
        return RecoverResult(None, tokenizer, report, out, complete=False)

    if config.train == "lora":
        student = student.merge_and_unload()
    student = student.to(pair.saved_dtype).eval()
    save_model(out, student, tokenizer, adapter_for(student).structure(student))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    report["wall_seconds_this_call"] = time.perf_counter() - started
    # CPU seconds of this process: on a shared machine wall time says as much about the others
    report["cpu_seconds_this_call"] = time.process_time() - cpu_started
    report["complete"] = True
    atomic_write_json(out / "report.json", report)
    return RecoverResult(student, tokenizer, report, out, complete=True)


def _micro_batch_size(student, teacher_dtype, config: RecoverConfig, autocast, progress) -> int:
    """Rows per forward and backward: the config's where it sets them; else the whole batch,
    or the most rows whose step the free memory holds (:mod:`~bonsai_prune.recover.step_memory`),
    said in one line. Refused before any training where not even one row would fit."""
    if config.micro_batch_size:
        return config.micro_batch_size
    free = available_memory()
    if free is None:
        return config.batch_size
    memory = probe_step_memory(student, teacher_dtype, config, autocast)
    rows = rows_that_fit(memory, config.batch_size, free)
    gib = 2**30
    if rows == 0:
        raise MemoryBudgetError(
            f"a recovery step needs about {memory.step_bytes(1) / gib:.1f} GiB beside the models "
            f"even one row of {config.max_length} tokens at a time, and {free / gib:.1f} GiB "
            "are free: free memory, lower --max-length, or --train lora"
        )
    if rows < config.batch_size and progress:
        print(
            f"recover: a step of {config.batch_size} rows would need about "
            f"{memory.step_bytes(config.batch_size) / gib:.1f} GiB and {free / gib:.1f} GiB are "
            f"free: {rows} rows at a time (the same gradients, to rounding; "
            "--micro-batch-size sets it)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _figures(state: TrainState) -> dict:
    train_seconds = sum(state.seconds[k] for k in ("teacher", "student", "optimizer"))
    return {
        "steps_done": state.step,
        "tokens": state.tokens,
        "tokens_per_second": state.tokens / train_seconds if train_seconds else None,
        "seconds": dict(state.seconds),
        "best": state.best,
        "evals": state.evals,
        "history": state.history,
    }


def _prepare_out(
    out: Path, run_dir: Path, config: RecoverConfig, *, resume: bool, overwrite: bool
) -> None:
    """Refuse to mix runs: a used ``out`` needs resume (same config) or overwrite."""
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--out {out} is a file; give a directory")
    if out.resolve() == run_dir.resolve():
        raise RunDirectoryError("--out must differ from the pruned run directory")
    used = out.is_dir() and any(out.iterdir())
    if resume and used:
        if not (out / RECOVER_CONFIG).is_file():
            raise RunDirectoryError(
                f"--resume: {out} holds no recovery run ({RECOVER_CONFIG} missing)"
            )
        saved = RecoverConfig.from_saved(read_json(out / RECOVER_CONFIG))
        if saved != config:
            changed = sorted(k for k, v in saved.to_dict().items() if config.to_dict()[k] != v)
            raise RunDirectoryError(
                f"--resume: {out} was started with different settings ({', '.join(changed)})"
            )
        if read_json(out / "report.json").get("complete"):
            raise RunDirectoryError(f"--resume: the recovery in {out} is already complete")
        return
    if used:
        if not overwrite:
            raise RunDirectoryError(f"{out} is not empty; use a new --out, --resume or --overwrite")
        for name in (
            "config.json",
            RECOVER_CONFIG,
            "report.json",
            "self_data.jsonl",
            "checkpoints",
            MODEL_DIR,
        ):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if (run_dir / "config.json").is_file():
        shutil.copyfile(run_dir / "config.json", out / "config.json")
    atomic_write_json(out / RECOVER_CONFIG, config.to_dict())
    atomic_write_json(out / "report.json", {"complete": False, "parent_run": str(run_dir)})


def _check_same_tokenizer(student_tok, teacher_tok, spec: str) -> None:
    """KL over next tokens only means something when both models index the same vocabulary."""
    if (
        student_tok.get_vocab() != teacher_tok.get_vocab()
        or student_tok.eos_token_id != teacher_tok.eos_token_id
    ):
        raise ModelLoadError(
            f"teacher {spec}'s tokenizer differs from the pruned model's "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens); give the model it was pruned from"
        )


def _training_sequences(
    teacher,
    tokenizer,
    problems,
    config: RecoverConfig,
    out: Path,
    progress: bool,
    shared: Path | None = None,
):
    """Sequences for the budget, drawn from ``problems`` in a seeded order (self data costs a
    generation per problem, so only what the budget needs is made; ``shared`` keeps the
    parent's solutions across runs)."""
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(config.seed))
    problems = [problems[i] for i in order.tolist()]
    sequences = []
    if config.data in ("gold", "both"):
        sequences += gold_sequences(
            tokenizer, problems, config.prompt, config.max_length, config.max_tokens
        )
    if config.data in ("self", "both"):
        sequences += self_sequences(
            teacher,
            tokenizer,
            problems,
            prompt=config.prompt,
            max_length=config.max_length,
            max_new_tokens=config.self_max_new_tokens,
            max_tokens=config.max_tokens,
            cache=out / "self_data.jsonl",
            shared=shared,
            progress=progress,
        )
    return sequences


def _wrap_lora(model, config: RecoverConfig):
    """LoRA adapters on every Linear of the decoder (peft's "all-linear" skips the LM head)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelLoadError(
            "train='lora' needs peft: pip install 'bonsai-prune[recover]'"
        ) from None
    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    return get_peft_model(model, lora)
