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

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import RunDirectoryError

STRUCTURE_FILE = "bonsai_structure.json"
MODEL_DIR = "model"


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise RunDirectoryError(f"{path} is not valid JSON ({e.msg})") from None


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


def save_model(out: Path, model, tokenizer, structure: dict) -> Path:
    """Write the pruned model to OUT/model, atomically (a temp folder renamed into place)."""
    target = Path(out) / MODEL_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".model."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / STRUCTURE_FILE, structure)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_pruned_dir(path: Path) -> bool:
    path = Path(path)
    return (path / STRUCTURE_FILE).is_file() or (path / MODEL_DIR / STRUCTURE_FILE).is_file()


def load_pruned(path: str | Path, device: str = "cpu"):
    """Load a pruned model saved by bonsai-prune: ``(model, tokenizer)`` in eval mode.

    ``path`` is a run directory or its ``model/`` folder. The dense architecture is built from
    config.json, given the pruned shapes from bonsai_structure.json, then filled from
    safetensors (strict: every tensor must match).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.adapter import ADAPTERS

    path = Path(path)
    folder = path / MODEL_DIR if (path / MODEL_DIR / STRUCTURE_FILE).is_file() else path
    if not (folder / STRUCTURE_FILE).is_file():
        raise RunDirectoryError(f"{path} holds no pruned model ({STRUCTURE_FILE} not found)")
    structure = read_json(folder / STRUCTURE_FILE)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    ADAPTERS.get(structure["family"])().restructure(model, structure)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer
