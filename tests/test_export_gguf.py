"""GGUF export: exact equal-group rewrite, the file's per-layer keys, and (where llama-cpp-python
is installed) greedy-token parity with the pruned HF model."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from conftest import tiny_llama
from test_export_hf import _pruned

from bonsai_prune.export.equal_groups import plan_equal_groups, rewrite_heads
from bonsai_prune.export.gguf_writer import export_gguf, permute_rotary
from bonsai_prune.export.llamacpp_speed import greedy_tokens
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


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_has_deci_per_layer_arrays(tmp_path, tokenizer, dtype):
    _, folder = _real_vocab_pruned(tmp_path, tokenizer)
    path = export_gguf(folder, tmp_path / "m.gguf", dtype=dtype)
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
    assert fields["deci.feed_forward_length"] == [96, 56, 89]
    assert fields["deci.attention.key_length"] == 16
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embedding
    assert "blk.0.attn_q.weight" in names  # the one zero head of the emptied layer 0
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


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
