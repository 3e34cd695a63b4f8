"""The Llama adapter: masked forward == sliced forward, exact parameter counts, reload."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from bonsai_prune.errors import UnsupportedModelError
from bonsai_prune.models import HEADS, NEURONS, adapter_for


def _keep_with_removals(layout, removed: list[int]) -> torch.Tensor:
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    keep[removed] = False
    return keep


# layer 0: heads 0-3, neurons 4-99; layer 1: heads 100-103, neurons 104-199
REMOVALS = {
    "one head and some neurons": [1, 5, 50, 150],
    "a whole K/V group (heads 0 and 1)": [0, 1, 10, 11, 102],
    "uneven groups in both layers": [0, 101, 102, 103 - 3, 120],
    "neurons only": list(range(4, 60)),
}


@pytest.mark.parametrize("removed", REMOVALS.values(), ids=REMOVALS.keys())
def test_masked_forward_equals_sliced_forward(removed):
    model = tiny_llama()
    adapter = adapter_for(model)
    keep = _keep_with_removals(adapter.layout(model), removed)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        with adapter.apply_masks(model, keep):
            masked = model(ids).logits
        dense = model(ids).logits
        adapter.slice(model, keep)
        sliced = model(ids).logits
    assert not torch.allclose(dense, masked, atol=1e-4), "the mask changed nothing"
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    assert adapter.layout(model).n_units == int(keep.sum())


def test_batched_masks_give_each_row_its_own_sub_model():
    model = tiny_llama()
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    keeps = torch.stack([_keep_with_removals(layout, r) for r in REMOVALS.values()])  # (4, U)
    ids = torch.randint(3, 128, (1, 10)).expand(len(keeps), -1)
    with torch.no_grad():
        with adapter.apply_masks(model, keeps):
            batched = model(ids).logits
        for row, keep in enumerate(keeps):
            with adapter.apply_masks(model, keep):
                single = model(ids[:1]).logits
            torch.testing.assert_close(batched[row : row + 1], single, atol=1e-5, rtol=1e-5)


def analytic_count(structure: dict, hidden: int, head_dim: int) -> int:
    """Parameters of the layers from their sizes alone (no bias in Llama; two norms per layer)."""
    total = hidden  # final norm
    for layer in structure["layers"]:
        q, kv, inter = layer["query_heads"], layer["kv_heads"], layer["intermediate_size"]
        total += (
            2 * q * head_dim * hidden + 2 * kv * head_dim * hidden + 3 * inter * hidden + 2 * hidden
        )
    return total


def test_parameter_count_after_slicing_is_analytic():
    model = tiny_llama()
    adapter = adapter_for(model)
    before = adapter.count_parameters(model)
    keep = _keep_with_removals(adapter.layout(model), [0, 1, 10, 11])  # group 0 of layer 0
    costs = adapter.unit_costs(model)
    adapter.slice(model, keep)
    after = adapter.count_parameters(model)
    assert after == analytic_count(adapter.structure(model), 64, 16)
    # removing both heads of a group frees their q/o rows and the whole K/V head
    assert before - after == pytest.approx(float(costs[~keep].sum()))
    assert adapter.structure(model)["layers"][0]["kv_heads"] == 1


def test_unit_costs_share_kv_among_query_heads():
    model = tiny_llama()
    costs = adapter_for(model).unit_costs(model)
    head = 2 * 16 * 64 + 2 * 16 * 64 / 2  # q rows + o cols + half of one K/V head
    assert costs[0] == pytest.approx(head)
    assert costs[4] == pytest.approx(3 * 64)


def test_layout_orders_heads_then_neurons_per_layer():
    model = tiny_llama()
    layout = adapter_for(model).layout(model)
    assert [(m.layer, m.kind, m.n_units) for m in layout.modules] == [
        (0, HEADS, 4),
        (0, NEURONS, 96),
        (1, HEADS, 4),
        (1, NEURONS, 96),
    ]
    assert layout.module_index.tolist()[:5] == [0, 0, 0, 0, 1]


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported.*llama"):
        adapter_for(model)


def test_stats_give_one_prior_value_per_unit():
    model = tiny_llama()
    adapter = adapter_for(model)
    with torch.no_grad(), adapter.collect_stats(model) as stats:
        model(torch.randint(3, 128, (1, 16)))
    result = stats.result()
    assert result.wanda.shape == result.weight_norm.shape == (adapter.layout(model).n_units,)
    assert bool((result.wanda > 0).all()) and bool(torch.isfinite(result.weight_norm).all())


def test_slice_then_save_and_reload_generates_the_same(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from bonsai_prune.models.pruned import load_pruned, save_model

    model = tiny_llama()
    adapter = adapter_for(model)
    adapter.slice(
        model, _keep_with_removals(adapter.layout(model), REMOVALS["uneven groups in both layers"])
    )
    tokenizer = _tiny_tokenizer()
    save_model(tmp_path, model, tokenizer, adapter.structure(model))
    reloaded, _ = load_pruned(tmp_path)
    ids = torch.randint(3, 128, (2, 8))
    kwargs = {
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "attention_mask": torch.ones_like(ids),
    }
    assert torch.equal(model.generate(ids, **kwargs), reloaded.generate(ids, **kwargs))
    assert adapter.count_parameters(reloaded) == adapter.count_parameters(model)
    assert isinstance(_, PreTrainedTokenizerFast)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
        pad_token="t0",
        eos_token="t1",
    )
