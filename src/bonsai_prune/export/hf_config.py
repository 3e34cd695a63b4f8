"""config.json of a pruned model folder, so that plain transformers loads it.

Stock transformers builds every layer from the global sizes. So:

- where every layer kept the same shape (same query heads, equal contiguous K/V groups, same
  MLP width, and transformers accepts the sizes), config.json is a stock config with those
  sizes: the folder is an ordinary model and needs no remote code;
- otherwise config.json is a ``BonsaiLlamaConfig`` (the dense sizes plus per-layer lists)
  with ``auto_map`` pointing at the configuration and modeling files copied next to it, and
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it.

``bonsai_structure.json`` stays next to it either way; it is what ``load_pruned`` reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from bonsai_prune.errors import UnsupportedModelError
from bonsai_prune.rundir.files import atomic_write_text, make_readable

REMOTE_DIR = Path(__file__).parent / "remote"
# family -> (remote model_type, configuration module, modeling module, class stem)
REMOTE_FAMILIES = {
    "llama": ("bonsai_llama", "configuration_bonsai_llama", "modeling_bonsai_llama", "BonsaiLlama"),
}
PER_LAYER_KEYS = ("layer_query_heads", "layer_kv_head_index", "layer_intermediate_sizes")


def uniform_shape(structure: dict) -> tuple[int, int, int] | None:
    """(query heads, K/V heads, MLP width) shared by every layer with equal contiguous groups,
    or None where layers differ (or a layer has no attention)."""
    layers = structure["layers"]
    shapes = {(s["query_heads"], s["kv_heads"], s["intermediate_size"]) for s in layers}
    if len(shapes) != 1:
        return None
    n_q, n_kv, width = shapes.pop()
    if n_q == 0 or n_q % n_kv:
        return None
    stock_index = [h // (n_q // n_kv) for h in range(n_q)]
    if any(s["kv_head_index"] != stock_index for s in layers):
        return None
    return n_q, n_kv, width


def pruned_config_dict(dense: dict, structure: dict) -> tuple[dict, bool]:
    """(config.json contents, needs remote code) for a model of ``structure`` whose dense
    config is ``dense`` (a ``PretrainedConfig.to_dict()``)."""
    config = {k: v for k, v in dense.items() if k not in (*PER_LAYER_KEYS, "auto_map")}
    shape = uniform_shape(structure)
    if shape is not None:
        stock = dict(config, model_type=structure["family"])
        stock["num_attention_heads"], stock["num_key_value_heads"], stock["intermediate_size"] = (
            shape
        )
        stock["head_dim"] = _head_dim(dense)
        if _stock_accepts(stock):
            return stock, False
    family = structure["family"]
    if family not in REMOTE_FAMILIES:
        raise UnsupportedModelError(
            f"uneven layers of family {family!r} have no remote code yet (only "
            f"{', '.join(REMOTE_FAMILIES)}); load the folder with bonsai_prune.load_pruned"
        )
    model_type, config_module, modeling_module, stem = REMOTE_FAMILIES[family]
    layers = structure["layers"]
    config.update(
        model_type=model_type,
        architectures=[f"{stem}ForCausalLM"],
        auto_map={
            "AutoConfig": f"{config_module}.{stem}Config",
            "AutoModelForCausalLM": f"{modeling_module}.{stem}ForCausalLM",
        },
        head_dim=_head_dim(dense),
        layer_query_heads=[s["query_heads"] for s in layers],
        layer_kv_head_index=[list(s["kv_head_index"]) for s in layers],
        layer_intermediate_sizes=[s["intermediate_size"] for s in layers],
    )
    return config, True


def write_config(folder: Path, dense: dict, structure: dict) -> bool:
    """Write config.json (and the remote code it needs) into ``folder``; True if remote code."""
    config, remote = pruned_config_dict(dense, structure)
    config.pop("transformers_version", None)
    if remote:
        _, config_module, modeling_module, _ = REMOTE_FAMILIES[structure["family"]]
        for module in (config_module, modeling_module):
            target = folder / f"{module}.py"
            shutil.copyfile(REMOTE_DIR / f"{module}.py", target)
            make_readable(target)
    atomic_write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return remote


def dense_config_dict(folder: Path) -> dict:
    """The family's own config (model_type as the adapter knows it) from a saved folder's
    config.json, whichever form it was written in."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    for family, (model_type, *_rest, stem) in REMOTE_FAMILIES.items():
        if config.get("model_type") == model_type:
            config = {k: v for k, v in config.items() if k not in (*PER_LAYER_KEYS, "auto_map")}
            config["model_type"] = family
            config["architectures"] = [f"{stem.removeprefix('Bonsai')}ForCausalLM"]
    return config


def _head_dim(dense: dict) -> int:
    return dense.get("head_dim") or dense["hidden_size"] // dense["num_attention_heads"]


def _stock_accepts(config: dict) -> bool:
    """Whether transformers builds this stock config (v5 refuses hidden % heads != 0)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        AutoConfig.for_model(config["model_type"], **fields)
    except (ValueError, TypeError):
        return False
    return True
