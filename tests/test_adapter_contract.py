"""The adapter contract, one row per registered family, on tiny random models from each config class.

Every row: masked forward equals sliced forward (uneven GQA groups included), each row of a
(B, U) mask is its own sub-model, the parameter count after slicing is exact (against the
family's own dense modules built at the sliced sizes), structure -> fresh model -> restructure
-> load_state_dict gives the same logits and the same greedy tokens, and an emptied attention
layer keeps generation exact, and compensated slicing fits the dense outputs better than
slicing. Adding a family adds one row to FAMILIES.

BONSAI_TEST_DEVICE=cuda runs the table on a GPU (scripts/gpu_contract.sh); the default is cpu.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bonsai_prune.models import ADAPTERS, HEADS, adapter_for
from bonsai_prune.models.compensation import Compensation, slice_units

DEVICE = torch.device(os.environ.get("BONSAI_TEST_DEVICE", "cpu"))
# GPU kernels (SDPA with and without the K/V gather) may round differently in the last bits
TOL = {"atol": 1e-5, "rtol": 1e-5} if DEVICE.type == "cpu" else {"atol": 1e-4, "rtol": 1e-4}
VOCAB = 128
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# family -> (config class, model class, what the family adds to COMMON)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    # Llama 3: 4:1 GQA, untied LM head, llama3 rope scaling
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "num_attention_heads": 8,
            "head_dim": 8,
            "tie_word_embeddings": False,
            "rope_parameters": LLAMA3_ROPE,
        },
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"head_dim": 16}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}),  # q/k norms, 4*24 != 64
    "mistral": ("MistralConfig", "MistralForCausalLM", {"head_dim": 16, "sliding_window": 4}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        # a soft cap this low bends every score, so an inexact (SDPA) path would show
        {"head_dim": 16, "sliding_window": 4, "attn_logit_softcapping": 0.5},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 24,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"head_dim": 16}),  # fused qkv and gate_up
}


def build(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` in eval mode (fp32, CPU)."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # some families zero-init norms; random ones make every weight count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2) if "gemma" in family else p.uniform_(0.5, 1.5)
    return model.to(DEVICE)


def uneven_keep(model, seed: int = 0) -> torch.Tensor:
    """Keep mask (U,): layer 0 loses query head 0 (groups become uneven); layer 1 loses its
    whole first K/V group and one head of the next (a K/V head goes, groups uneven); about a
    third of each MLP's neurons go at random."""
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    for module in layout.modules:
        units = torch.arange(module.n_units)
        if module.kind == HEADS:
            removed = units[:1] if module.layer == 0 else units[: group + 1]
        else:
            removed = units[torch.rand(module.n_units, generator=generator) < 0.35]
        keep[module.offset + removed] = False
    return keep


def ids_and_mask(n_rows: int = 2, length: int = 12, seed: int = 0):
    """Token ids (n_rows, length) with the first row left-padded by 3, and its attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_rows, length), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


def greedy(model, ids, mask) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_forward_equals_sliced_forward(family):
    model = build(family)
    adapter = adapter_for(model)
    keep = uneven_keep(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        with adapter.apply_masks(model, keep):
            masked = model(ids, attention_mask=mask).logits
        dense = model(ids, attention_mask=mask).logits
        adapter.slice(model, keep)
        sliced = model(ids, attention_mask=mask).logits
    assert not torch.allclose(dense, masked, atol=1e-4), "the mask changed nothing"
    torch.testing.assert_close(sliced, masked, **TOL)
    assert adapter.layout(model).n_units == int(keep.sum())
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    layers = adapter.structure(model)["layers"]
    assert [layer["query_heads"] for layer in layers] == [
        n_heads - 1,
        n_heads - n_heads // n_kv - 1,
    ]
    assert [layer["kv_heads"] for layer in layers] == [n_kv, n_kv - 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_masks_give_each_row_its_own_sub_model(family):
    model = build(family)
    adapter = adapter_for(model)
    keeps = torch.stack([uneven_keep(model, seed) for seed in range(3)])  # (3, U)
    keeps[2, : adapter.layout(model).modules[0].n_units] = True  # rows differ in heads too
    ids = ids_and_mask(1, 10)[0].expand(len(keeps), -1)
    with torch.no_grad():
        with adapter.apply_masks(model, keeps):
            batched = model(ids).logits
        for row, keep in enumerate(keeps):
            with adapter.apply_masks(model, keep):
                single = model(ids[:1]).logits
            torch.testing.assert_close(batched[row : row + 1], single, **TOL)
    assert not torch.allclose(batched[0], batched[2], atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_after_slicing_is_exact(family):
    """Whole K/V groups and neurons removed alike in every layer: the sliced model has the
    parameters of the family's own dense model built at those sizes, and its costs add up."""
    model = build(family)
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    n_heads, n_kv = model.config.num_attention_heads, model.config.num_key_value_heads
    group, n_neurons = n_heads // n_kv, model.config.intermediate_size
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    for module in layout.modules:  # the first K/V group and the last 20 neurons of each layer
        removed = range(group) if module.kind == HEADS else range(n_neurons - 20, n_neurons)
        keep[[module.offset + i for i in removed]] = False
    before, costs = adapter.count_parameters(model), adapter.unit_costs(model)
    # per-head-dim q/k norms (Qwen3, Gemma 3) are shared by a layer's heads: each head's cost
    # holds an equal share, freed only with the layer's last head (see the emptied-layer test)
    head_norms = sum(
        p.numel()
        for n, p in model.model.layers.named_parameters()
        if "self_attn" in n and "norm" in n
    )
    adapter.slice(model, keep)
    reference = build(
        family,
        num_attention_heads=n_heads - group,
        num_key_value_heads=n_kv - 1,
        intermediate_size=n_neurons - 20,
    )
    after = adapter.count_parameters(model)
    assert after == sum(p.numel() for p in reference.model.layers.parameters()) + sum(
        p.numel() for p in reference.model.norm.parameters()
    )
    freed = float(costs[~keep].sum()) - head_norms * group / n_heads
    assert before - after == pytest.approx(freed, abs=1e-6)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_with_shared_costs_frees_what_it_counts(family):
    """Any selection charged with the adapter's exact costs (a K/V head goes with its group's
    last query head) frees exactly ``removed_params`` when sliced, within the budget."""
    from bonsai_prune.core.budget import selection_costs
    from bonsai_prune.core.selection import select_units

    for seed in range(3):
        model = build(family, seed=seed)
        adapter = adapter_for(model)
        layout = adapter.layout(model)
        costs, shared = selection_costs(adapter, model)
        score = torch.rand(layout.n_units, generator=torch.Generator().manual_seed(seed))
        floors = torch.ones(len(layout.modules), dtype=torch.long)
        budget = 0.3 * adapter.count_parameters(model)
        selection = select_units(
            score.double(), costs, budget, layout.module_index, floors, shared=shared
        )
        before = adapter.count_parameters(model)
        adapter.slice(model, selection.keep)
        assert before - adapter.count_parameters(model) == selection.removed_params <= budget


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_restructure_reload_gives_same_logits_and_tokens(family):
    model = build(family)
    adapter = adapter_for(model)
    adapter.slice(model, uneven_keep(model))
    structure = json.loads(json.dumps(adapter.structure(model)))  # as saved: JSON only
    assert structure["family"] == family
    fresh = build(family, seed=1)
    ADAPTERS.get(structure["family"])().restructure(fresh, structure)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        )
        assert torch.equal(greedy(fresh, ids, mask), greedy(model, ids, mask))
    assert adapter.structure(fresh) == structure
    assert adapter.count_parameters(fresh) == adapter.count_parameters(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_emptied_attention_layer_generates_as_masked(family):
    """A layer that loses every query head: logits and greedy tokens (through the KV cache)
    equal the masked model's."""
    model = build(family)
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    keep = uneven_keep(model)
    keep[layout.modules[0].units] = False  # all of layer 0's heads
    ids, mask = ids_and_mask()
    with torch.no_grad():
        with adapter.apply_masks(model, keep):
            masked, masked_tokens = model(ids, attention_mask=mask).logits, greedy(model, ids, mask)
        costs, before = adapter.unit_costs(model), adapter.count_parameters(model)
        adapter.slice(model, keep)
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, masked, **TOL)
        assert torch.equal(greedy(model, ids, mask), masked_tokens)
    assert adapter.layout(model).modules[0].n_units == 0
    heads_freed = float(costs[layout.modules[0].units].sum())
    assert heads_freed == pytest.approx(
        sum(p.numel() for p in build(family).model.layers[0].self_attn.parameters())
    )
    assert before - adapter.count_parameters(model) >= heads_freed - 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_give_one_positive_value_per_unit(family):
    model = build(family)
    adapter = adapter_for(model)
    adapter.slice(model, uneven_keep(model))
    with torch.no_grad(), adapter.collect_stats(model) as stats:
        model(ids_and_mask()[0])
    result = stats.result()
    n_units = adapter.layout(model).n_units
    assert result.wanda.shape == result.weight_norm.shape == (n_units,)
    assert bool((result.wanda > 0).all()) and bool((result.weight_norm > 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_output_projections_read_each_module_and_compensation_refits_them(family):
    """``output_projections`` names, per module with units, a linear with width channels per
    unit; compensated slicing brings layer 0's attention output (its inputs are the dense
    model's) and the logits on the calibration text closer to the dense model's than slicing."""
    models = {name: build(family) for name in ("dense", "sliced", "compensated")}
    adapter = adapter_for(models["dense"])
    for module in adapter.layout(models["dense"]).modules:
        linear, width = adapter.output_projections(models["dense"])[(module.layer, module.kind)]
        assert linear.in_features == module.n_units * width
    keep = uneven_keep(models["dense"])
    ids, mask = ids_and_mask(n_rows=4, length=24)
    adapter.slice(models["sliced"], keep)
    slice_units(adapter, models["compensated"], keep, Compensation(ids, mask))
    outputs, logits = {}, {}
    for name, model in models.items():
        o_proj = adapter.output_projections(model)[(0, HEADS)][0]
        handle = o_proj.register_forward_hook(
            lambda m, a, out, name=name: outputs.update({name: out})
        )
        with torch.no_grad():
            logits[name] = model(ids, attention_mask=mask).logits[mask.bool()]
        handle.remove()
    real = mask.bool()

    def error(name: str, values: dict) -> float:
        part = values[name] if values is logits else values[name][real]
        dense = values["dense"] if values is logits else values["dense"][real]
        return float((part - dense).norm())

    assert error("compensated", outputs) < 0.9 * error("sliced", outputs)
    assert error("compensated", logits) < error("sliced", logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_head_index_moves_with_the_model_and_keeps_its_dtype(family):
    """What a CUDA run relies on, checked without a GPU: the K/V map is made where the weights
    are; model.to(dtype) leaves it a long tensor and the model runs in that dtype;
    model.to(device) moves it along (to "meta" here, to "cuda" on a GPU: the same code path)."""
    model = build(family)
    adapter = adapter_for(model)
    adapter.slice(model, uneven_keep(model))

    def kv_maps():
        return [m.kv_head_index for m in model.modules() if hasattr(m, "kv_head_index")]

    assert len(kv_maps()) == 2 and all(i.device == model.device for i in kv_maps())
    model.to(torch.float64)
    assert all(i.dtype == torch.long for i in kv_maps())
    with torch.no_grad():
        assert model(ids_and_mask()[0]).logits.dtype == torch.float64
    model.to("meta")
    assert all(i.device.type == "meta" for i in kv_maps())


def test_every_registered_family_has_a_row():
    assert sorted(FAMILIES) == ADAPTERS.names()
