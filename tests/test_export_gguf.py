"""GGUF export: exact equal-group rewrite, the file's per-layer keys, and (where llama-cpp-python
is installed) greedy-token parity with the pruned HF model."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import tiny_llama, tiny_llama_for, tiny_llama_over
from test_export_hf import _pruned

from bonsai_prune.errors import ConfigError
from bonsai_prune.export.equal_groups import plan_equal_groups, rewrite_heads
from bonsai_prune.export.gguf_writer import export_gguf, pad_mlp, permute_rotary
from bonsai_prune.export.llamacpp_speed import (
    compare_decode_speed,
    greedy_tokens,
    quantize,
    weight_bytes,
)
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.models.pruned import save_model

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize(
    "kv_index",
    [[0, 0, 0, 1, 2, 2], [0, 1, 1], [0, 0, 1, 1], [2, 0, 2, 1], [0]],
)
def test_plan_gives_equal_contiguous_groups(kv_index):
    plan = plan_equal_groups(kv_index)
    assert plan.n_query_heads == plan.group_size * plan.n_kv_heads
    kept = [h for h in plan.query_source if h is not None]
    assert sorted(kept) == list(range(len(kv_index)))  # every query head kept once
    for slot, head in enumerate(plan.query_source):
        if head is not None:  # slot's contiguous K/V head is a copy of the head it read
            assert plan.kv_source[slot // plan.group_size] == kv_index[head]


def test_plan_keeps_equal_groups_as_they_are():
    plan = plan_equal_groups([0, 0, 1, 1])
    assert plan.query_source == (0, 1, 2, 3) and plan.kv_source == (0, 1)


def test_rewrite_leaves_the_model_output_unchanged():
    """Uneven groups rewritten into equal ones: same logits through the stock K/V mapping."""
    model = tiny_llama(seed=3, layers=2)
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    keep[layout.modules[0].offset] = False  # layer 0: heads 1,2,3 -> K/V [0, 1, 1]
    adapter.slice(model, keep)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        before = model(ids).logits
    structure = adapter.structure(model)
    attn = model.model.layers[0].self_attn
    plan = plan_equal_groups(structure["layers"][0]["kv_head_index"])
    q, k, v, o = rewrite_heads(
        attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, plan, 16
    )
    state = {k_: t.clone() for k_, t in model.state_dict().items()}
    p = "model.layers.0.self_attn."
    state.update({p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v})
    state[p + "o_proj.weight"] = o
    structure["layers"][0].update(
        query_heads=plan.n_query_heads,
        kv_heads=plan.n_kv_heads,
        kv_head_index=[s // plan.group_size for s in range(plan.n_query_heads)],
    )
    rebuilt = tiny_llama(seed=9, layers=2)
    adapter.restructure(rebuilt, structure)
    rebuilt.load_state_dict(state, strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(ids).logits, before)


def test_permute_rotary_pairs_halves_within_each_head():
    w = torch.arange(2 * 8, dtype=torch.float32)[:, None]  # 2 heads of dim 8, rows numbered
    out = permute_rotary(w, 8)[:, 0].tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def _real_vocab_pruned(tmp_path, tokenizer):
    """The uneven tiny model with the packaged vocabulary (so the packaged tokenizer fits)."""
    model, _ = _pruned(uneven=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.vocab_size = len(tokenizer)
    folder = save_model(tmp_path / "run", model, tokenizer, adapter_for(model).structure(model))
    return model, folder


@pytest.mark.parametrize(
    "dtype, mlp_multiple, widths",
    [("f16", None, [96, 56, 89]), ("q8_0", None, [96, 64, 96]), ("f16", 64, [128, 64, 128])],
)
def test_gguf_has_deci_per_layer_arrays(tmp_path, tokenizer, dtype, mlp_multiple, widths):
    _, folder = _real_vocab_pruned(tmp_path, tokenizer)
    path = export_gguf(folder, tmp_path / "m.gguf", dtype=dtype, mlp_multiple=mlp_multiple)
    reader = gguf.GGUFReader(str(path))
    fields = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
    }
    assert fields["general.architecture"] == "deci"
    # layer 0 lost its attention: it keeps one all-zero head (llama.cpp reads the head size
    # only when layer 0 has heads); layer 1's groups [0, 1, 1] become 2 equal groups of 2 (one
    # zero head) over 2 K/V heads, which costs less than 3 single-head groups
    assert fields["deci.attention.head_count"] == [1, 4, 4]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 2]
    # Q8_0 pads each MLP with zero neurons to a multiple of 32 unless told otherwise, so that
    # ffn_down quantises
    assert fields["deci.feed_forward_length"] == widths
    assert fields["deci.attention.key_length"] == 16
    names = {t.name for t in reader.tensors}
    down_types = {t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")}
    assert down_types == ({"F16"} if dtype == "f16" else {"Q8_0"})
    assert "output.weight" not in names  # tied embedding
    assert "blk.0.attn_q.weight" in names  # the one zero head of the emptied layer 0
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("width", [1, 31, 32, 33, 89])
def test_zero_neurons_pad_the_mlp_without_changing_it(width):
    torch.manual_seed(width)
    gate, up, down = torch.randn(width, 64), torch.randn(width, 64), torch.randn(64, width)
    x = torch.randn(5, 64, dtype=torch.float64)  # float64: only the summation order differs
    gate, up, down = gate.double(), up.double(), down.double()

    def mlp(g, u, d):
        return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T

    padded = pad_mlp(gate, up, down, 32)
    assert padded[0].shape[0] % 32 == 0 and padded[0].shape[0] - width < 32
    assert padded[2].shape == (64, padded[0].shape[0])
    torch.testing.assert_close(mlp(*padded), mlp(gate, up, down), rtol=1e-12, atol=1e-12)


def test_mlp_multiple_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="mlp_multiple"):
        export_gguf(tmp_path, tmp_path / "m.gguf", mlp_multiple=0)


def test_unknown_dtype_is_refused(tmp_path):
    from bonsai_prune.errors import ConfigError

    with pytest.raises(ConfigError, match="q8_0"):
        export_gguf(tmp_path, tmp_path / "m.gguf", dtype="q4")


PROMPTS = ["Question: Tom has 3 apples", "The capital of France is", "def add(a, b):"]


def test_llama_cpp_greedy_tokens_match_hf(tmp_path, tokenizer):
    """f16 GGUF in llama.cpp: the same 32 greedy tokens as the pruned HF model, 3 prompts."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)"
    )
    model, folder = _real_vocab_pruned(tmp_path, tokenizer)
    path = export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            hf = model.generate(
                ids,
                max_new_tokens=32,
                do_sample=False,
                use_cache=True,
                output_logits=True,
                return_dict_in_generate=True,
            )
        expected = hf.sequences[0, ids.shape[1] :].tolist()
        got = greedy_tokens(llm, ids[0].tolist(), 32)
        if got != expected:
            # f16 weights against fp32 may flip a near-tie of a random tiny model's flat logits;
            # anything else (a wrong head map, a missing permutation) diverges by far more
            j = next(i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b)
            logits = hf.logits[j][0]  # (V,) the HF logits where the two first differ
            margin = float(logits[expected[j]] - logits[got[j]])
            assert j >= 8 and margin < 0.05, (prompt, j, margin)


def _dense_folder(tmp_path, tokenizer, tied: bool):
    """A dense tiny Llama on the packaged vocabulary, saved as a plain Hugging Face folder."""
    model = tiny_llama_over(tokenizer, seed=2, tied=tied)
    folder = tmp_path / f"dense-{tied}"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_are_the_parameters_a_decode_step_reads(tmp_path, tokenizer, tied):
    """f16: 2 bytes per matrix weight, 4 per norm weight; an untied model's embedding is not
    read whole (one row per token), its separate head is."""
    model, folder = _dense_folder(tmp_path, tokenizer, tied)
    path = export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    params = dict(model.named_parameters())  # a tied head is the embedding, listed once
    if not tied:
        del params["model.embed_tokens.weight"]
    expected = sum((2 if p.dim() == 2 else 4) * p.numel() for p in params.values())
    assert weight_bytes(path) == expected


def test_comparing_one_gguf_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at least two"):
        compare_decode_speed({"dense": tmp_path / "m.gguf"})


def test_llama_cpp_compare_decode_speed_pairs_rounds(tmp_path, tokenizer):
    """Every round times both models; each ratio is that round's dense over pruned ms/token,
    and the ceiling is the ratio of the two files' weight bytes."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)"
    )
    dense_folder = tmp_path / "dense"
    tiny_llama_for(tokenizer, seed=1, layers=3).save_pretrained(dense_folder)  # _pruned's parent
    _, pruned_folder = _real_vocab_pruned(tmp_path, tokenizer)
    paths = {
        "dense": export_gguf(dense_folder, tmp_path / "dense.gguf"),
        "pruned": export_gguf(pruned_folder, tmp_path / "pruned.gguf"),
    }
    result = compare_decode_speed(paths, n_tokens=4, rounds=3)
    ms = result.ms_per_token
    assert result.baseline == "dense" and set(result.speedup) == {"pruned"}
    assert len(ms["dense"]) == len(ms["pruned"]) == 3 and min(ms["dense"] + ms["pruned"]) > 0
    for ratio, d, p in zip(result.speedup["pruned"], ms["dense"], ms["pruned"], strict=True):
        assert ratio == pytest.approx(d / p)
    nbytes = result.weight_bytes
    assert result.ceiling["pruned"] == nbytes["dense"] / nbytes["pruned"] > 1


@pytest.mark.parametrize("mlp_multiple, down_types", [(1, {"Q8_0", "F16"}), (32, {"Q8_0"})])
def test_llama_quantize_reaches_padded_mlps(tmp_path, tokenizer, mlp_multiple, down_types):
    """llama.cpp's quantiser leaves a down projection of a pruned width (56, 89) in f16; padded
    to a multiple of 32 every one quantises."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)"
    )
    _, folder = _real_vocab_pruned(tmp_path, tokenizer)
    f16 = export_gguf(folder, tmp_path / "m.gguf", mlp_multiple=mlp_multiple)
    path = quantize(f16, tmp_path / "m.q8.gguf", "q8_0")
    tensors = gguf.GGUFReader(str(path)).tensors
    assert {t.tensor_type.name for t in tensors if t.name.endswith("ffn_down.weight")} == down_types


def test_unknown_llama_cpp_type_is_refused(tmp_path):
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (pip install llama-cpp-python)"
    )
    with pytest.raises(ConfigError, match="Q4_K_M"):
        quantize(tmp_path / "m.gguf", tmp_path / "q.gguf", "q3_z")
