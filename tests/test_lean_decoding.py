"""The lean decoder (models/decoding.py) against transformers' generate, for every family.

A family the decoder runs must give the same greedy tokens as ``model.generate`` with left
padding, uneven GQA groups, an emptied attention layer or MLP, sliding windows (Mistral's window is 4
here, shorter than the sequences) and a batch of virtual masks (one sub-model per row); a family
it does not run must say why, and the project's generation then falls back to transformers.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_adapter_contract import FAMILIES, build, ids_and_mask, uneven_keep

from bonsai_prune.models import adapter_for
from bonsai_prune.models.decoding import greedy_decode, why_not_lean

LEAN = [f for f in FAMILIES if adapter_for(build(f)).lean_decoding is None]
NEW = 10


def hf_greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    """Without an end-of-sequence id: every row runs NEW tokens (as greedy_decode, stop=None)
    unless ``kwargs`` give stopping criteria."""
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        **kwargs,
    )


def assert_sliced_decodes_as_transformers(model, keep: torch.Tensor) -> None:
    adapter_for(model).slice(model, keep)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        assert torch.equal(lean_greedy(model, ids, mask), hf_greedy(model, ids, mask))


def lean_greedy(model, ids, mask) -> torch.Tensor:
    assert why_not_lean(model) is None
    return greedy_decode(model, ids, mask, NEW, pad_token_id=0)


def test_the_common_families_are_lean():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(LEAN)


@pytest.mark.parametrize("family", LEAN)
def test_dense_and_sliced_models_decode_as_transformers(family):
    model = build(family)
    ids, mask = ids_and_mask(3, 12)
    with torch.no_grad():
        assert torch.equal(lean_greedy(model, ids, mask), hf_greedy(model, ids, mask))
        adapter_for(model).slice(model, uneven_keep(model))  # uneven groups, a K/V head gone
        assert torch.equal(lean_greedy(model, ids, mask), hf_greedy(model, ids, mask))


@pytest.mark.parametrize("family", LEAN)
def test_a_short_last_group_decodes_as_transformers(family):
    """Groups (g, ..., g, g - 1) are in order but not a (n_kv, g) view: the last query head
    removed (the bench's random slice found this)."""
    model = build(family)
    adapter = adapter_for(model)
    keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
    heads = adapter.layout(model).modules[0]
    keep[heads.offset + heads.n_units - 1] = False
    assert_sliced_decodes_as_transformers(model, keep)


@pytest.mark.parametrize("family", LEAN)
def test_emptied_attention_layer_decodes_as_transformers(family):
    model = build(family)
    adapter = adapter_for(model)
    keep = uneven_keep(model)
    keep[adapter.layout(model).modules[0].units] = False
    assert_sliced_decodes_as_transformers(model, keep)


@pytest.mark.parametrize("family", LEAN)
def test_emptied_mlp_decodes_as_transformers(family):
    """FinerCut removes whole MLPs: a width-0 projection has no packed layout (oneDNN refuses
    one; the study's first FinerCut evaluation stopped there)."""
    model = build(family)
    adapter = adapter_for(model)
    keep = uneven_keep(model)
    neurons = [m for m in adapter.layout(model).modules if m.kind == "neurons"]
    keep[neurons[-1].units] = False
    assert_sliced_decodes_as_transformers(model, keep)


@pytest.mark.parametrize("family", LEAN)
def test_batched_masks_act_in_the_lean_decoder(family):
    """apply_masks' hooks on o_proj/down_proj act in the lean step: each row its sub-model."""
    model = build(family)
    adapter = adapter_for(model)
    keeps = torch.stack([uneven_keep(model, seed) for seed in range(3)])
    ids = ids_and_mask(1, 10)[0].expand(3, -1)
    mask = torch.ones_like(ids)
    with torch.no_grad(), adapter.apply_masks(model, keeps):
        lean = lean_greedy(model, ids, mask)
        assert torch.equal(lean, hf_greedy(model, ids, mask))
    with torch.no_grad():
        assert not torch.equal(lean, lean_greedy(model, ids, mask)), "the masks changed nothing"


def test_fused_weights_follow_training_and_slicing():
    """A weight changed in place (a training step) or replaced (slicing) is seen next call."""
    model = build("llama")
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = lean_greedy(model, ids, mask)
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(-3.0)
        assert torch.equal(lean_greedy(model, ids, mask), hf_greedy(model, ids, mask))
        assert not torch.equal(lean_greedy(model, ids, mask), before)


def test_slicing_frees_the_fused_copy_and_the_next_call_rebuilds_it():
    """The fused Q/K/V and gate/up copy does not outlive the weights it was built from."""
    from bonsai_prune.models import decoding
    from bonsai_prune.models.compensation import slice_units

    model = build("llama")
    adapter = adapter_for(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        lean_greedy(model, ids, mask)
        assert model in decoding._FUSED
        slice_units(adapter, model, uneven_keep(model), None)
        assert model not in decoding._FUSED
        assert torch.equal(lean_greedy(model, ids, mask), hf_greedy(model, ids, mask))
        assert model in decoding._FUSED


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_decode_as_plain_ones(dtype, monkeypatch):
    """Where the torch build packs weights (oneDNN), every weight a step multiplies is packed,
    and the tokens equal the plain weights' ones, with batched masks on o_proj/down_proj (run
    as the modules' pre-hooks) and with a forward hook (the module is called as it is)."""
    from bonsai_prune.models import decoding

    if not decoding._packing_works():
        pytest.skip("this torch build has no oneDNN packed linear: the plain path runs")
    model = build("llama").to(dtype)
    adapter = adapter_for(model)
    keeps = torch.stack([uneven_keep(model, seed) for seed in range(3)])
    ids = ids_and_mask(1, 10)[0].expand(3, -1)
    mask = torch.ones_like(ids)
    down = model.model.layers[1].mlp.down_proj
    with torch.no_grad(), adapter.apply_masks(model, keeps):
        packed = lean_greedy(model, ids, mask)
        fused = decoding._FUSED[model][1]
        assert fused.head.layout == torch._mkldnn
        for spec in fused.layers:
            assert {spec.qkv[0].layout, spec.o.layout, spec.down.layout} == {torch._mkldnn}
        handle = down.register_forward_hook(lambda *args: None)
        hooked = lean_greedy(model, ids, mask)
        handle.remove()
        monkeypatch.setattr(decoding, "_packing_works", lambda: False)
        decoding.release_fused(model)
        plain = lean_greedy(model, ids, mask)
        assert decoding._FUSED[model][1].head.layout == torch.strided
    assert torch.equal(packed, plain) and torch.equal(hooked, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", LEAN)
def test_norms_and_rotary_take_fewer_ops_for_the_same_floats(family, dtype):
    """The decoder's RMS norm (no fp32 casts in fp32) and rotary embedding (q and k in one go,
    a roll and a sign-folded sine) give transformers' floats bit for bit; a norm of another
    formula is called as it is."""
    import importlib

    from bonsai_prune.models.decoding import _norm, _rope, _signed_sin

    model = build(family).to(dtype)
    body = model.model
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(3, 1, model.config.hidden_size, generator=generator).to(dtype) * 4
    norms = [body.norm, *(layer.post_attention_layernorm for layer in body.layers)]
    for norm in norms:
        fast = _norm(norm)
        assert fast is not norm, f"{type(norm).__name__}: the fast norm was not taken"
        assert torch.equal(fast(h), norm(h))
    layer_norm = torch.nn.LayerNorm(model.config.hidden_size).to(dtype)
    assert _norm(layer_norm) is layer_norm

    modeling = importlib.import_module(type(model).__module__)
    attn = body.layers[0].self_attn
    d = attn.head_dim
    q = torch.randn(3, attn.config.num_attention_heads, 1, d, generator=generator).to(dtype)
    k = torch.randn(3, attn.config.num_key_value_heads, 1, d, generator=generator).to(dtype)
    cos, sin = body.rotary_emb(h, torch.tensor([[5], [17], [40]]))
    want_q, want_k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    # the decoder's layout: (B, heads, d) with the step's (B, 1, d) cos/sin on the heads axis
    qk = torch.cat([q, k], dim=1)[:, :, 0]
    got = _rope(qk, cos, _signed_sin(sin))
    assert torch.equal(got, torch.cat([want_q, want_k], dim=1)[:, :, 0])


def test_stop_ends_rows_as_transformers_and_pads_them():
    from transformers import StoppingCriteria, StoppingCriteriaList

    model = build("llama")
    ids, mask = ids_and_mask(3, 12)
    width = ids.shape[1]

    def stop(sequences):  # row r ends after r + 2 new tokens
        return torch.tensor([sequences.shape[1] - width >= r + 2 for r in range(3)])

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop(input_ids)

    with torch.no_grad():
        lean = greedy_decode(model, ids, mask, NEW, pad_token_id=0, stop=stop)
        hf = hf_greedy(model, ids, mask, stopping_criteria=StoppingCriteriaList([Stop()]))
    assert lean.shape[1] == hf.shape[1] == width + 4
    for row in range(3):  # equal up to each row's end; after it the lean decoder pads
        end = width + row + 2
        assert torch.equal(lean[row, :end], hf[row, :end])
        assert bool((lean[row, end:] == 0).all())


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(LEAN)))
def test_other_families_say_why_they_are_not_lean(family):
    reason = why_not_lean(build(family))
    assert reason and "lean decoder" in reason


def test_other_hooks_and_lora_fall_back():
    model = build("llama")
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: None)
    assert "forward hook" in why_not_lean(model)
    handle.remove()
    assert why_not_lean(model) is None
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert why_not_lean(lora.base_model.model) is not None


def test_a_model_whose_decode_copies_would_not_fit_falls_back(monkeypatch):
    """The decoder lays the weights out again; where that copy would take over half the free
    memory (a large model on a small machine), transformers decodes instead. A model whose
    copies exist already keeps them."""
    from bonsai_prune.models import decoding

    model = build("llama")
    copies = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(decoding, "available_memory", lambda: 2 * copies)
    assert why_not_lean(model) is None
    monkeypatch.setattr(decoding, "available_memory", lambda: 2 * copies - 1)
    assert "would take over half the free memory" in why_not_lean(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        greedy_decode(model, ids, mask, 2, pad_token_id=0)  # its copies built: it fits now
    assert why_not_lean(model) is None
    monkeypatch.setattr(decoding, "available_memory", lambda: None)  # unknown: lean
    decoding.release_fused(model)
    assert why_not_lean(model) is None


def test_available_memory_reads_this_machine():
    from bonsai_prune.memory import available_memory

    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo: the free memory is unknown here, and the decoder lean")
    assert 2**20 < available_memory() < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="module")
def real_model():
    from bonsai_prune.models import load_model

    return load_model("default", dtype="fp32")


@pytest.mark.parametrize("stop", ["answer", "question", "none"])
def test_project_generation_is_the_same_on_either_path(stop, real_model, monkeypatch):
    """generate_greedy (U† scoring, evaluation, self-data) gives the same texts, token counts and
    finished flags through the lean decoder as through transformers, on the packaged model.

    Each prompt holds its gold solution but the last line, so rows end early and at different
    steps (an answer line, end-of-sequence) while others run to the cap.
    """
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.data.prompts import format_prompt, worked_solution
    from bonsai_prune.utility import generation

    model, tokenizer = real_model
    tokenizer.padding_side = "left"
    problems = load_gsm8k("test")[:4]
    prompts = [format_prompt(tokenizer, p.question) for p in problems]
    prompts[:3] = [
        text + worked_solution(p).rsplit("\n", 1)[0] + "\n"
        for text, p in zip(prompts[:3], problems, strict=False)
    ]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert why_not_lean(model) is None

    def run():
        return generation.generate_greedy(
            model, tokenizer, enc["input_ids"], enc["attention_mask"], 24, stop=stop
        )

    lean = run()
    assert any(lean.finished) and not all(lean.finished), lean.n_tokens
    monkeypatch.setattr(generation, "why_not_lean", lambda m: "forced fallback")
    assert lean == run()
