"""GGUF for llama.cpp: a pruned (or dense) Llama folder written as llama.cpp's ``deci`` model.

``deci`` (DeciLM / Nemotron-NAS) is llama.cpp's Llama with per-layer head counts, K/V head
counts and FFN widths; a layer with 0 heads has no attention. llama.cpp's converter forces
query heads to the global count and FFN widths to multiples of 256, so this module writes the
file itself with the ``gguf`` package:

- per-layer arrays ``deci.attention.head_count``, ``head_count_kv``, ``feed_forward_length``,
  explicit ``key_length``/``value_length`` and rope dimension count;
- q and k rows in llama.cpp's rotary order (``permute_rotary``, as convert_hf_to_gguf.py's
  ``LlamaModel.permute``), per head;
- uneven GQA groups rewritten exactly into equal contiguous ones (:mod:`.equal_groups`);
- a layer whose MLP is empty but whose attention is not gets a 1-wide MLP with zero weights
  (llama.cpp skips the rest of a layer, attention output included, when its FFN width is 0);
- MLP widths padded with zero neurons to a multiple of ``mlp_multiple`` (:func:`pad_mlp`; 32 in
  Q8_0 by default): Q8_0 quantises rows in blocks of 32, and a pruned width left ``ffn_down``
  in f16, twice the bytes; llama-quantize's k-quants need 256;
- tokenizer keys copied from a dense GGUF of the same vocabulary (the packaged one by default);
- no output tensor when the embedding is tied (llama.cpp then reuses token_embd).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bonsai_prune.errors import ConfigError, ModelLoadError, UnsupportedModelError
from bonsai_prune.export.equal_groups import plan_equal_groups, rewrite_heads
from bonsai_prune.export.hf_config import dense_config_dict
from bonsai_prune.rundir.files import make_readable

ARCH = "deci"
DTYPES = ("f16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantises a row 32 values at a time: rows of other lengths stay f16
TOKENIZER_PREFIXES = ("tokenizer.",)


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    dtype: str = "f16",
    tokenizer_gguf: str | Path | None = None,
    mlp_multiple: int | None = None,
) -> Path:
    """Write ``model_dir`` (a run directory, its model/ folder, or a dense HF Llama folder) to
    ``out_path`` as a llama.cpp GGUF; returns the path. Written atomically, mode 0644.

    dtype: f16 (2-D weights f16, norms f32) or q8_0 (2-D weights whose rows are a multiple of
    32 long in Q8_0, the others f16). tokenizer_gguf: a dense GGUF whose tokenizer keys are
    copied (default: the packaged SmolLM2 GGUF, which fits only its own vocabulary).
    mlp_multiple: pad every MLP with zero neurons to a multiple of this (exact, :func:`pad_mlp`);
    default 32 in Q8_0 (its block), 1 in f16. llama-quantize leaves a down projection whose
    width is not a multiple of 32 in f16, and its k-quants need 256.
    """
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r} is not supported; choose {' or '.join(DTYPES)}")
    if mlp_multiple is None:
        mlp_multiple = Q8_BLOCK if dtype == "q8_0" else 1
    if mlp_multiple < 1:
        raise ConfigError(f"mlp_multiple must be at least 1, got {mlp_multiple}")
    folder = _model_folder(Path(model_dir))
    config = dense_config_dict(folder)
    if config.get("model_type") != "llama":
        raise UnsupportedModelError(
            f"GGUF export supports Llama-family models, not {config.get('model_type')!r}; "
            "export the Hugging Face folder instead"
        )
    _check_rope(config)
    structure = _structure(folder, config)
    state = _load_state(folder)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    tokenizer = _tokenizer_fields(tokenizer_gguf, config["vocab_size"])

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, ARCH)
        layers = _write_layers(writer, state, structure, head_dim, dtype, mlp_multiple)
        _write_hparams(writer, config, layers, head_dim, dtype)
        for field in tokenizer:
            writer.add_key_value(*field)
        _add_tensor(writer, "token_embd.weight", state["model.embed_tokens.weight"], dtype)
        _add_tensor(writer, "output_norm.weight", state["model.norm.weight"], dtype)
        if not config.get("tie_word_embeddings", False):
            _add_tensor(writer, "output.weight", state["lm_head.weight"], dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        make_readable(Path(tmp))
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def permute_rotary(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q or k rows (n_heads*d, hidden) from HF's rotary layout (first half / second half of
    each head) to llama.cpp's (interleaved pairs), head by head."""
    hidden = weight.shape[1]
    heads = weight.reshape(-1, 2, head_dim // 2, hidden)  # (n_heads, 2, d/2, hidden)
    return heads.swapaxes(1, 2).reshape(weight.shape)


def _model_folder(path: Path) -> Path:
    from bonsai_prune.models.pruned import MODEL_DIR, STRUCTURE_FILE

    for folder in (path / MODEL_DIR, path):
        if (folder / STRUCTURE_FILE).is_file() or (folder / "config.json").is_file():
            if list(folder.glob("*.safetensors")):
                return folder
    raise ModelLoadError(
        f"{path} holds no model to export (no config.json with safetensors); give a run "
        "directory, its model/ folder or a Hugging Face model folder"
    )


def _check_rope(config: dict) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(
            f"GGUF export handles plain RoPE only, not rope_type {kind!r}; export the Hugging "
            "Face folder instead"
        )


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _structure(folder: Path, config: dict) -> dict:
    """bonsai_structure.json, or the dense structure of a plain HF folder."""
    from bonsai_prune.models.pruned import STRUCTURE_FILE
    from bonsai_prune.rundir.files import read_json

    if (folder / STRUCTURE_FILE).is_file():
        return read_json(folder / STRUCTURE_FILE)
    n_q, n_kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    layer = {
        "query_heads": n_q,
        "kv_heads": n_kv,
        "kv_head_index": [h // (n_q // n_kv) for h in range(n_q)],
        "intermediate_size": config["intermediate_size"],
    }
    return {"family": "llama", "layers": [dict(layer) for _ in range(config["num_hidden_layers"])]}


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    biases = [k for k in state if k.endswith(".bias") or k.endswith(".o_bias")]
    if biases:
        raise UnsupportedModelError(
            f"GGUF export of models with biases ({biases[0]}) is not supported; export the "
            "Hugging Face folder instead"
        )
    return {k: v.float() for k, v in state.items()}


def _write_layers(
    writer, state: dict, structure: dict, head_dim: int, dtype: str, mlp_multiple: int
) -> list[tuple[int, int, int]]:
    """Add every block's tensors; return (query heads, K/V heads, FFN width) per layer."""
    shapes = []
    for i, layer in enumerate(structure["layers"]):
        p = f"model.layers.{i}."
        n_q = n_kv = 0
        if layer["query_heads"] > 0 or i == 0:
            if layer["query_heads"] > 0:
                plan = plan_equal_groups(layer["kv_head_index"])
                q, k, v, o = rewrite_heads(
                    state[p + "self_attn.q_proj.weight"],
                    state[p + "self_attn.k_proj.weight"],
                    state[p + "self_attn.v_proj.weight"],
                    state[p + "self_attn.o_proj.weight"],
                    plan,
                    head_dim,
                )
                n_q, n_kv = plan.n_query_heads, plan.n_kv_heads
            else:
                # llama.cpp reads key_length (the head size of every layer) only when layer 0
                # has heads; an emptied layer 0 gets one all-zero head, whose output is exactly 0
                hidden = state[p + "input_layernorm.weight"].shape[0]
                q = k = v = state[p + "input_layernorm.weight"].new_zeros(head_dim, hidden)
                o = q.new_zeros(hidden, head_dim)
                n_q = n_kv = 1
            _add_tensor(
                writer, f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], dtype
            )
            _add_tensor(writer, f"blk.{i}.attn_q.weight", permute_rotary(q, head_dim), dtype)
            _add_tensor(writer, f"blk.{i}.attn_k.weight", permute_rotary(k, head_dim), dtype)
            _add_tensor(writer, f"blk.{i}.attn_v.weight", v, dtype)
            _add_tensor(writer, f"blk.{i}.attn_output.weight", o, dtype)
        gate, up, down = (state[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
        width = gate.shape[0]
        if width == 0 and n_q > 0:  # see the module docstring: a zero 1-wide MLP adds exactly 0
            gate, up, down = (
                gate.new_zeros(1, gate.shape[1]),
                up.new_zeros(1, up.shape[1]),
                down.new_zeros(down.shape[0], 1),
            )
            width = 1
        if width % mlp_multiple:
            gate, up, down = pad_mlp(gate, up, down, mlp_multiple)
            width = gate.shape[0]
        if width > 0:
            _add_tensor(
                writer,
                f"blk.{i}.ffn_norm.weight",
                state[p + "post_attention_layernorm.weight"],
                dtype,
            )
            _add_tensor(writer, f"blk.{i}.ffn_gate.weight", gate, dtype)
            _add_tensor(writer, f"blk.{i}.ffn_up.weight", up, dtype)
            _add_tensor(writer, f"blk.{i}.ffn_down.weight", down, dtype)
        shapes.append((n_q, n_kv, width))
    return shapes


def pad_mlp(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, multiple: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up (width x hidden) and down (hidden x width) widened with zero neurons to a
    multiple of ``multiple``: a zero neuron's act(0) x 0 meets a zero column of down, so the
    MLP's output is exactly the same, and every row of down splits into whole blocks."""
    extra = -gate.shape[0] % multiple
    return (
        torch.cat([gate, gate.new_zeros(extra, gate.shape[1])]),
        torch.cat([up, up.new_zeros(extra, up.shape[1])]),
        torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1),
    )


def _write_hparams(
    writer, config: dict, layers: list[tuple[int, int, int]], head_dim: int, dtype: str
) -> None:
    import gguf

    writer.add_name("bonsai-prune pruned model")
    writer.add_block_count(len(layers))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length([w for _, _, w in layers])
    writer.add_head_count([q for q, _, _ in layers])
    writer.add_head_count_kv([kv for _, kv, _ in layers])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> None:
    """1-D tensors as f32; 2-D as f16, or Q8_0 where rows split into 32-blocks."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif dtype == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _tokenizer_fields(source: str | Path | None, vocab_size: int) -> list[tuple]:
    """(key, value, type, sub_type) of every tokenizer key in a dense GGUF of the same vocabulary."""
    import gguf

    from bonsai_prune.models.loading import packaged_gguf

    path = Path(source) if source is not None else packaged_gguf()
    if not path.is_file():
        raise ModelLoadError(
            f"tokenizer GGUF {path} does not exist; give a dense GGUF of the parent model"
        )
    reader = gguf.GGUFReader(str(path))
    fields = []
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIXES):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub_type))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0
    if n_tokens != vocab_size:
        raise ConfigError(
            f"the tokenizer GGUF {path.name} has {n_tokens} tokens but the model {vocab_size}; "
            "pass tokenizer_gguf= a dense GGUF of the parent model (llama.cpp convert_hf_to_gguf.py)"
        )
    return fields
