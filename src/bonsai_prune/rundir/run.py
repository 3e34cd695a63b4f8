"""The run directory: safetensors and JSON only (no pickle), every file written atomically.

Layout::

    OUT/
      config.json            the PruneConfig of the run
      report.json            figures of the run; "complete": true only once it has finished
      rounds/round_001.safetensors   keep masks sampled, utilities, beta, kept units
      rounds/round_001.json          the round's figures
      model/                 the pruned model (HF files + bonsai_structure.json) and tokenizer

Loading never executes code from the directory: configs are JSON, tensors are safetensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from bonsai_prune.config import PruneConfig
from bonsai_prune.errors import RunDirectoryError
from bonsai_prune.models.pruned import MODEL_DIR
from bonsai_prune.rundir.files import atomic_save_tensors, atomic_write_json, read_json

RUN_ENTRIES = ("config.json", "report.json", "rounds", "keep.safetensors", MODEL_DIR)


def round_path(out: Path, index: int, suffix: str) -> Path:
    return Path(out) / "rounds" / f"round_{index:03d}.{suffix}"


def save_round(out: Path, index: int, tensors: dict[str, torch.Tensor], figures: dict) -> None:
    """Tensors first, then the JSON: a round counts as done only when its JSON exists."""
    atomic_save_tensors(round_path(out, index, "safetensors"), tensors)
    atomic_write_json(round_path(out, index, "json"), figures)


def load_round(out: Path, index: int) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(round_path(out, index, "safetensors"))), read_json(
        round_path(out, index, "json")
    )


def completed_rounds(out: Path) -> int:
    """How many consecutive rounds, from the first, have both their files."""
    n = 0
    while (
        round_path(out, n + 1, "json").is_file() and round_path(out, n + 1, "safetensors").is_file()
    ):
        n += 1
    return n


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
        saved = PruneConfig.from_dict(read_json(out / "config.json"))
        if saved != config:
            changed = sorted(k for k, v in saved.to_dict().items() if config.to_dict()[k] != v)
            raise RunDirectoryError(
                f"--resume: {out} was started with different settings ({', '.join(changed)}); "
                "resume with the same command, or use a new --out"
            )
        return completed_rounds(out)
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
