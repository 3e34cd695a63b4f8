"""Compensation: the least-squares refit of a projection's kept columns (core/compensation.py)
and compensated slicing in the methods (models/compensation.py, PruneConfig.compensate)."""

from __future__ import annotations

import pytest
import torch

from bonsai_prune.core.compensation import refit_kept_columns


def _data(seed: int = 0, tokens: int = 400, channels: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    w = torch.randn(out, channels, generator=g, dtype=torch.float64)
    kept = torch.ones(channels, dtype=torch.bool)
    kept[[1, 4, 7]] = False
    return x, w, kept


def test_removed_channels_that_are_combinations_of_kept_ones_are_absorbed_exactly():
    x, w, kept = _data()
    x[:, ~kept] = x[:, kept] @ torch.randn(int(kept.sum()), 3, dtype=torch.float64)
    refit = refit_kept_columns(w, x.T @ x, kept, damping=0.0)
    assert torch.allclose(x[:, kept] @ refit[:, kept].T, x @ w.T, atol=1e-8)


def test_the_refit_never_fits_the_calibration_outputs_worse_than_dropping():
    for seed in range(5):
        x, w, kept = _data(seed)
        target = x @ w.T
        refit = refit_kept_columns(w, x.T @ x, kept, damping=0.0)
        dropped = (x[:, kept] @ w[:, kept].T - target).norm()
        fitted = (x[:, kept] @ refit[:, kept].T - target).norm()
        assert fitted < dropped
        assert torch.equal(refit[:, ~kept], w[:, ~kept])  # slicing drops them


def test_nothing_to_refit_and_bad_shapes():
    x, w, kept = _data()
    gram = x.T @ x
    assert refit_kept_columns(w, gram, torch.ones_like(kept)) is w
    assert refit_kept_columns(w, gram, torch.zeros_like(kept)) is w
    half = refit_kept_columns(w.float(), gram, kept)
    assert half.dtype == torch.float32  # computed in float64, returned as given
    with pytest.raises(ValueError, match="needs a \\(12, 12\\) gram"):
        refit_kept_columns(w, gram[:5, :5], kept)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        refit_kept_columns(w, gram, kept, damping=-1.0)


# ---- compensated slicing in the methods (models/compensation.py, PruneConfig.compensate) ----


def _wanda(tokenizer, compensate: bool):
    from conftest import tiny_llama_for

    from bonsai_prune import PruneConfig, UtilityConfig
    from bonsai_prune.methods import METHODS
    from bonsai_prune.methods.base import PruneContext

    config = PruneConfig(
        method="wanda",
        sparsity=0.3,
        calib_samples=2,
        compensate=compensate,
        compensate_samples=4,
        utility=UtilityConfig(max_length=192),
    )
    model = tiny_llama_for(tokenizer)
    context = PruneContext.create(model, tokenizer, config, progress=False)
    return model, METHODS.get("wanda")(context), context.compensation


def test_compensation_keeps_the_selection_and_fits_the_dense_model_better(tokenizer):
    from conftest import tiny_llama_for

    plain, plain_result, none = _wanda(tokenizer, compensate=False)
    fitted, fitted_result, compensation = _wanda(tokenizer, compensate=True)
    assert none is None and compensation is not None
    assert torch.equal(plain_result.keep, fitted_result.keep)  # it changes weights, not choices
    assert plain_result.params_after == fitted_result.params_after
    dense = tiny_llama_for(tokenizer)
    ids, mask = compensation.input_ids, compensation.attention_mask
    with torch.no_grad():
        target = dense(ids, attention_mask=mask).logits[mask.bool()]
        errors = {
            name: float((model(ids, attention_mask=mask).logits[mask.bool()] - target).norm())
            for name, model in (("plain", plain), ("fitted", fitted))
        }
    assert errors["fitted"] < 0.9 * errors["plain"], errors


def test_refit_outputs_leaves_untouched_and_emptied_modules_alone(tokenizer):
    from conftest import tiny_llama_for

    from bonsai_prune.models import adapter_for
    from bonsai_prune.models.compensation import Compensation, refit_outputs

    model = tiny_llama_for(tokenizer)
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    compensation = Compensation(torch.randint(3, 1000, (2, 10)), torch.ones(2, 10))
    assert refit_outputs(adapter, model, keep, compensation) == 0
    first, second = layout.modules[0], layout.modules[1]
    keep[first.units] = False  # emptied: nothing can absorb it
    keep[second.offset] = False  # thinned: refitted
    assert refit_outputs(adapter, model, keep, compensation) == 1
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{second.layer}.mlp.down_proj.weight"}


def test_compensation_is_on_by_default_and_old_runs_read_as_without_it():
    from bonsai_prune import PruneConfig

    assert PruneConfig().compensate is True
    old = PruneConfig.from_saved(
        {k: v for k, v in PruneConfig().to_dict().items() if not k.startswith("compensate")}
    )
    assert old.compensate is False
    # a cache key hashes only what departs from the older runs: their keys stay valid
    assert "compensate" not in old.identity() and "compensate_samples" not in old.identity()
    assert PruneConfig().identity()["compensate"] is True


def test_the_cli_turns_compensation_off_and_checks_the_sample_count():
    import argparse

    from bonsai_prune import PruneConfig
    from bonsai_prune.cli_options import add_config_options, config_from_args
    from bonsai_prune.errors import ConfigError

    parser = argparse.ArgumentParser()
    add_config_options(parser, PruneConfig)
    assert config_from_args(PruneConfig, parser.parse_args([])).compensate is True
    args = parser.parse_args(["--no-compensate"])
    assert config_from_args(PruneConfig, args).compensate is False
    assert "ones wrote (default: on)" in " ".join(parser.format_help().split())
    with pytest.raises(ConfigError, match="compensate_samples must be an integer >= 1"):
        PruneConfig(compensate_samples=0)


@pytest.mark.parametrize("width", [1, 4])
def test_removal_error_is_what_the_refit_leaves_of_each_unit_removed_alone(width):
    from bonsai_prune.core.compensation import refit_kept_columns, removal_errors

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)  # (tokens, channels)
    x[:, 5] += 0.8 * x[:, 2]  # correlated channels: a refit can make up for some of a removal
    weight = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    gram = x.T @ x
    errors = removal_errors(weight, gram, width, damping=0.0)
    assert errors.shape == (12 // width,)
    for unit in range(12 // width):
        kept = torch.ones(12, dtype=torch.bool)
        kept[unit * width : (unit + 1) * width] = False
        refitted = refit_kept_columns(weight, gram, kept, damping=0.0)
        left = x[:, kept] @ refitted[:, kept].T - x @ weight.T
        assert float(errors[unit]) == pytest.approx(float(left.pow(2).sum()), rel=1e-6)
        plain = (x[:, ~kept] @ weight[:, ~kept].T).pow(2).sum()  # removed without a refit
        assert float(errors[unit]) <= float(plain) + 1e-9


def test_gram_chunks_take_whole_layers_deepest_first_within_the_budget(tokenizer):
    from conftest import tiny_llama_for

    from bonsai_prune.models import adapter_for
    from bonsai_prune.models.compensation import gram_chunks

    model = tiny_llama_for(tokenizer, layers=4)
    targets = {
        key: linear for key, (linear, _) in adapter_for(model).output_projections(model).items()
    }
    layer_bytes = {layer: 0 for layer, _ in targets}
    for (layer, _), linear in targets.items():
        layer_bytes[layer] += 4 * linear.in_features**2
    budget = 2 * max(layer_bytes.values())
    chunks = gram_chunks(targets, budget)
    assert sorted(key for chunk in chunks for key in chunk) == sorted(targets)
    firsts = [min(layer for layer, _ in chunk) for chunk in chunks]
    assert firsts == sorted(firsts, reverse=True) and len(chunks) == 2  # deepest first
    for chunk in chunks:
        layers = {layer for layer, _ in chunk}
        assert sum(layer_bytes[layer] for layer in layers) <= budget
        assert all((layer, kind) in chunk for layer in layers for _, kind in targets)
    assert len(gram_chunks(targets, 1)) == 4  # a budget below one layer: a layer per chunk
    assert len(gram_chunks(targets, 10**12)) == 1


def test_chunked_grams_and_refits_equal_the_single_pass_ones(tokenizer, monkeypatch):
    from conftest import tiny_llama_for

    from bonsai_prune.models import adapter_for
    from bonsai_prune.models.compensation import (
        Compensation,
        chunked_input_grams,
        input_grams,
        refit_outputs,
    )

    model = tiny_llama_for(tokenizer, layers=3)
    adapter = adapter_for(model)
    targets = {key: linear for key, (linear, _) in adapter.output_projections(model).items()}
    ids = torch.randint(3, 1000, (3, 12))
    mask = torch.ones(3, 12)
    mask[0, :4] = 0  # padding stays out of the Gram matrices
    text = Compensation(ids, mask)
    whole = input_grams(model, targets, text)
    chunks = list(chunked_input_grams(model, targets, text, budget_bytes=1))
    assert len(chunks) == 3 and [min(c)[0] for c in chunks] == [2, 1, 0]
    for chunk in chunks:
        for key, gram in chunk.items():
            assert torch.equal(gram, whole[key]), key

    keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
    keep[torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(0))[:40]] = False
    refitted = {}
    for budget in (1, 10**12):  # a layer per chunk, then every layer in one pass
        copy = tiny_llama_for(tokenizer, layers=3)
        monkeypatch.setattr("bonsai_prune.models.compensation.GRAM_BYTES", budget)
        assert refit_outputs(adapter, copy, keep, text) > 0
        refitted[budget] = copy.state_dict()
    for name, weight in refitted[1].items():
        assert torch.equal(weight, refitted[10**12][name]), name
