"""Pruned models on disk: Hugging Face files that load anywhere, plus the structure that rebuilds them.

A saved folder holds the safetensors (stock Llama weight names), the tokenizer, the generation
config, ``bonsai_structure.json`` (per layer: query heads, K/V head map, MLP width) and a
config.json that plain transformers understands (see :mod:`bonsai_prune.export.hf_config`):
a stock config where every layer kept one shape, else remote code copied into the folder.

:func:`load_pruned` never executes code from the folder: it reads JSON and safetensors, builds
the model at its pruned shapes directly (a one-head, one-neuron skeleton that the adapter then
gives the saved shapes; no dense model is allocated) and applies the saved generation config.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file

from bonsai_prune.errors import RunDirectoryError, UnsupportedModelError
from bonsai_prune.rundir.files import atomic_write_dir, atomic_write_json, read_json

STRUCTURE_FILE = "bonsai_structure.json"
MODEL_DIR = "model"


def save_model(out: Path, model, tokenizer, structure: dict) -> Path:
    """Write the pruned model to OUT/model: written aside, then renamed in (rundir.files).

    The folder loads with plain transformers too (export.hf_config writes its config.json);
    its files are readable by others, like any other model folder.
    """
    from bonsai_prune.export.hf_config import write_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / STRUCTURE_FILE, structure)
        try:
            # the config.json transformers just wrote: its own choice of keys, dense sizes
            write_config(folder, read_json(folder / "config.json"), structure)
        except UnsupportedModelError:
            pass  # a family without remote code keeps its dense config: load_pruned reads it

    return atomic_write_dir(Path(out) / MODEL_DIR, write)


def is_pruned_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory or a model folder written by :func:`save_model`."""
    path = Path(path)
    return (path / STRUCTURE_FILE).is_file() or (path / MODEL_DIR / STRUCTURE_FILE).is_file()


def pruned_folder(path: str | Path) -> Path:
    """The model folder of a run directory (or the folder itself); RunDirectoryError if none."""
    path = Path(path)
    folder = path / MODEL_DIR if (path / MODEL_DIR / STRUCTURE_FILE).is_file() else path
    if not (folder / STRUCTURE_FILE).is_file():
        raise RunDirectoryError(
            f"{path} holds no pruned model ({STRUCTURE_FILE} not found); give a run directory "
            "or its model/ folder"
        )
    return folder


def load_pruned(path: str | Path, device: str = "cpu"):
    """Load a pruned model saved by bonsai-prune: ``(model, tokenizer)`` in eval mode.

    ``path`` is a run directory or its ``model/`` folder. The model is the family's stock class
    with pruned modules (what the adapters work on), filled from safetensors (strict: every
    tensor must match) and carrying the saved generation config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from bonsai_prune.models.adapter import ADAPTERS

    folder = pruned_folder(path)
    structure = read_json(folder / STRUCTURE_FILE)
    config = _family_config(folder)
    with _skeleton_sizes(config):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    ADAPTERS.get(structure["family"])().restructure(model, structure)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    with _quiet_transformers():  # it reads config.json, whose bonsai_llama it need not know
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def _family_config(folder: Path):
    """The family's own config class from config.json (stock, remote-code or dense form)."""
    from transformers import CONFIG_MAPPING

    from bonsai_prune.export.hf_config import dense_config_dict

    data = dense_config_dict(folder)
    model_type = data.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise RunDirectoryError(
            f"{folder}/config.json has model_type {model_type!r}, unknown to transformers; "
            "save the model again with this version of bonsai-prune"
        )
    return CONFIG_MAPPING[model_type].from_dict(data)


@contextmanager
def _quiet_transformers():
    """transformers' warnings off within the block (a remote-code config.json makes
    AutoTokenizer warn about a model type it does not need)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextmanager
def _skeleton_sizes(config):
    """Within the block ``config`` asks for one query head, one K/V head and one MLP neuron per
    layer (head_dim pinned), so building the model allocates almost nothing before the adapter
    gives each layer its saved shape. The same config object is restored afterwards, because
    modules keep a reference to it."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    saved = {
        k: getattr(config, k, None)
        for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim")
    }  # noqa: E501
    had_head_dim = hasattr(config, "head_dim")
    try:
        config.num_attention_heads = config.num_key_value_heads = config.intermediate_size = 1
        config.head_dim = head_dim
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)
        if not had_head_dim:
            del config.head_dim
