"""Pruned models on disk: Hugging Face files plus the per-layer structure that rebuilds them.

Loading never executes code from the folder: configs are JSON, tensors are safetensors.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from bonsai_prune.errors import RunDirectoryError
from bonsai_prune.rundir.files import atomic_write_dir, atomic_write_json, read_json

STRUCTURE_FILE = "bonsai_structure.json"
MODEL_DIR = "model"


def save_model(out: Path, model, tokenizer, structure: dict) -> Path:
    """Write the pruned model to OUT/model: written aside, then renamed in (rundir.files)."""

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / STRUCTURE_FILE, structure)

    return atomic_write_dir(Path(out) / MODEL_DIR, write)


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

    from bonsai_prune.models.adapter import ADAPTERS

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
