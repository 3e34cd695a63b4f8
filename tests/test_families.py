"""What single families add beyond the contract table: the attention path each one runs after
slicing, and Phi-3's per-layer view of the shared config."""

from __future__ import annotations

import copy

import pytest
import torch
from test_adapter_contract import build, ids_and_mask, uneven_keep

from bonsai_prune.models import adapter_for


@pytest.mark.parametrize(
    ("family", "overrides", "expected"),
    [
        ("llama", {}, "bonsai_sdpa"),
        ("gemma2", {}, "bonsai_eager"),  # soft-capping: no SDPA path
        ("gemma2", {"attn_logit_softcapping": None}, "bonsai_eager"),  # Gemma2 has no SDPA
        ("gemma3_text", {}, "bonsai_sdpa"),  # soft-capping off by default
        # transformers' Gemma3Attention ignores the field: SDPA stays exact
        ("gemma3_text", {"attn_logit_softcapping": 0.5}, "bonsai_sdpa"),
    ],
)
def test_sliced_model_runs_the_exact_attention_path(family, overrides, expected):
    model = build(family, **overrides)
    adapter = adapter_for(model)
    keep = uneven_keep(model)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        with adapter.apply_masks(model, keep):
            masked = model(ids, attention_mask=mask).logits
        adapter.slice(model, keep)
        sliced = model(ids, attention_mask=mask).logits
    assert model.config._attn_implementation == expected
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)


def test_phi3_layers_see_their_own_head_count_and_the_shared_rest():
    model = build("phi3")
    adapter = adapter_for(model)
    adapter.slice(model, uneven_keep(model))
    attn = model.model.layers[1].self_attn
    assert attn.config.num_attention_heads == 1 and attn.num_key_value_heads == 1
    assert model.config.num_attention_heads == 4  # what config.json says: the dense model
    model.set_attn_implementation("bonsai_eager")  # a later switch reaches every layer
    assert attn.config._attn_implementation == "bonsai_eager"
    twin = copy.deepcopy(model)  # the view copies with its model, pointing at the copy's config
    assert twin.model.layers[1].self_attn.config._base is twin.config
    ids = ids_and_mask()[0]
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits)
