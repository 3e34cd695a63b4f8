"""Baseline methods: the contract table over every registered method, their scoring rules, and
the empty attention sub-layer FinerCut leaves behind (masked == sliced, KV cache, reload)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama, tiny_llama_for

from bonsai_prune import PruneConfig, UtilityConfig
from bonsai_prune.methods import METHODS
from bonsai_prune.methods.base import PruneContext, relative_importance
from bonsai_prune.methods.finercut import js_divergence
from bonsai_prune.models import HEADS, NEURONS, adapter_for
from bonsai_prune.models.llama import EmptyAttention

CONFIG = PruneConfig(
    sparsity=0.3, calib_samples=2, tolerance=0.01, utility=UtilityConfig(max_length=192)
)


def tiny_model(tokenizer, seed: int = 0):
    return tiny_llama_for(tokenizer, seed)


def run_method(name: str, tokenizer, config: PruneConfig = CONFIG):
    model = tiny_model(tokenizer)
    adapter = adapter_for(model)
    max_unit = float(adapter.unit_costs(model).max())
    result = METHODS.get(name)(PruneContext.create(model, tokenizer, config, progress=False))
    return model, result, max_unit


@pytest.fixture(scope="module")
def results(tokenizer):
    return {name: run_method(name, tokenizer) for name in METHODS.names()}


# ---- the contract: every registered method ---------------------------------------------------


def test_every_method_is_registered():
    assert {"bonsai", "random", "magnitude", "wanda", "finercut"} <= set(METHODS.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_method_reaches_the_target_and_leaves_a_working_model(name, results):
    model, result, max_unit = results[name]
    adapter = adapter_for(model)
    assert result.params_before - result.params_after == pytest.approx(
        result.sparsity * result.params_before
    )
    assert result.params_after == adapter.count_parameters(model)
    assert result.sparsity >= CONFIG.sparsity - CONFIG.tolerance
    assert result.sparsity <= CONFIG.sparsity + max_unit / result.params_before  # < 1 unit over
    assert int(result.keep.sum()) == adapter.layout(model).n_units
    with torch.no_grad():
        logits = model(torch.randint(3, 1000, (2, 9))).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("name", METHODS.names())
def test_same_seed_gives_the_same_keep(name, results, tokenizer):
    _, again, _ = run_method(name, tokenizer)
    assert torch.equal(results[name][1].keep, again.keep)


def test_a_different_seed_draws_a_different_random_keep(results, tokenizer):
    config = PruneConfig(**{**CONFIG.to_dict(), "seed": 1})
    _, other, _ = run_method("random", tokenizer, config)
    assert not torch.equal(results["random"][1].keep, other.keep)


@pytest.mark.parametrize("name", METHODS.names())
def test_mlp_multiple_keeps_every_mlp_width_a_multiple(name, tokenizer):
    config = PruneConfig(**{**CONFIG.to_dict(), "mlp_multiple": 8})
    model, result, max_unit = run_method(name, tokenizer, config)
    widths = [m.n_units for m in adapter_for(model).layout(model).modules if m.kind == NEURONS]
    assert all(width % 8 == 0 for width in widths), widths
    assert widths != [96, 96]  # the MLPs were pruned, not just left
    block = 8 * 3 * 64  # 8 neurons of a 64-wide model: up, gate and down
    assert config.sparsity - config.tolerance <= result.sparsity
    assert result.sparsity <= config.sparsity + max(block, max_unit) / result.params_before


@pytest.mark.parametrize("name", ["random", "wanda"])
def test_units_heads_leaves_every_neuron(name, tokenizer):
    config = PruneConfig(**{**CONFIG.to_dict(), "sparsity": 0.15, "unit_kinds": "heads"})
    model, result, _ = run_method(name, tokenizer, config)
    kept = result.details["kept_per_module"]
    assert kept["layer0.neurons"] == kept["layer1.neurons"] == 96
    assert result.sparsity >= config.sparsity - config.tolerance


def test_finercut_removes_whole_sublayers(results):
    model, result, _ = results["finercut"]
    emptied = [name for name, n in result.details["kept_per_module"].items() if n == 0]
    assert emptied and [s["module"] for s in result.details["removed_sublayers"]] == emptied
    assert all(0 <= s["js"] <= math.log(2) for s in result.details["removed_sublayers"])


def test_finercut_trial_forwards_start_at_their_layer_with_the_same_numbers(tokenizer):
    """A candidate's forward starts at its layer from the recorded inputs (the layers below
    pass through): exactly the whole forward's divergence, so the greedy picks as before."""
    from bonsai_prune.methods import finercut

    model = tiny_model(tokenizer)
    adapter = adapter_for(model)
    context = PruneContext.create(model, tokenizer, CONFIG, progress=False)
    batch = context.make_batch(1)
    reference = list(finercut.log_prob_chunks(model, finercut.target_hidden(model, batch)))
    layout = adapter.layout(model)
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    keep[layout.modules[1].units] = False  # layer 0's MLP removed so far
    start = finercut.LayerInputs.record(model, adapter, batch, keep)
    for module in layout.modules[2:]:  # layer 1's sub-layers
        trial = keep.clone()
        trial[module.units] = False
        whole = finercut.mean_divergence(model, adapter, batch, trial, reference)
        started = finercut.mean_divergence(
            model, adapter, batch, trial, reference, start, module.layer
        )
        assert started == whole and module.layer == 1
    assert all("forward" not in vars(layer) for layer in adapter._layers(model))  # restored


def test_finercut_picks_the_same_sublayers_with_whole_forwards(results, tokenizer, monkeypatch):
    from bonsai_prune.methods import finercut

    monkeypatch.setattr(finercut.LayerInputs, "record", classmethod(lambda *a: None))
    _, whole, _ = run_method("finercut", tokenizer)
    started = results["finercut"][1]
    assert whole.details["removed_sublayers"] == started.details["removed_sublayers"]
    assert torch.equal(whole.keep, started.keep)


class _Killed(Exception):
    """Stands in for a kill between two of FinerCut's checkpoints."""


def test_finercut_killed_between_removals_resumes_to_the_same_model(tokenizer, tmp_path):
    """Each removal is checkpointed in the run directory; ``resume`` takes the saved ones as
    made and continues: the same removals, keep mask and weights as an uninterrupted run."""
    from bonsai_prune import prune
    from bonsai_prune.methods import finercut
    from bonsai_prune.rundir import run as rundir

    config = PruneConfig(**{**CONFIG.to_dict(), "method": "finercut", "sparsity": 0.4})
    trials = []  # sub-models scored, per run
    real_divergence = finercut.mean_divergence

    def run(out, **kwargs):
        model = tiny_llama_for(tokenizer, layers=4)
        trials.append(0)

        def counted(*args, **kw):
            trials[-1] += 1
            return real_divergence(*args, **kw)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(finercut, "mean_divergence", counted)
            return prune(
                config, model=model, tokenizer=tokenizer, out_dir=out, progress=False, **kwargs
            )

    whole = run(tmp_path / "whole")
    removed = whole.report["method_details"]["removed_sublayers"]
    assert len(removed) >= 2  # a kill after the first removal leaves work to resume

    saved = []
    real_save = rundir.save_checkpoint

    def save_then_die(out, state):
        if saved:
            raise _Killed
        real_save(out, state)
        saved.append(state)

    killed = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rundir, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run(killed)
    assert len(rundir.load_checkpoint(killed)["steps"]) == 1
    assert not (killed / "model").exists()

    resumed = run(killed, resume=True)
    assert resumed.report["resumed_from_checkpoint"] is True
    assert trials[2] < trials[0]  # the saved removal's candidates were not scored again
    assert resumed.report["method_details"]["removed_sublayers"] == removed
    assert torch.equal(resumed.keep_masks[0], whole.keep_masks[0])
    expected = whole.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_resume_of_a_method_without_checkpoints_is_refused(tokenizer, tmp_path):
    from bonsai_prune import RunDirectoryError, prune

    config = PruneConfig(**{**CONFIG.to_dict(), "method": "wanda"})
    with pytest.raises(RunDirectoryError, match="one-shot: rerun it with --overwrite"):
        prune(config, tokenizer=tokenizer, out_dir=tmp_path, progress=False, resume=True)


# ---- scoring rules: pure functions -----------------------------------------------------------


def test_relative_importance_is_per_module_and_per_parameter():
    # module 0: two heads of cost 10 with stats 1 and 3; module 1: neurons of cost 1, stats x100
    stat = torch.tensor([1.0, 3.0, 100.0, 300.0, 0.0])
    costs = torch.tensor([10.0, 10.0, 1.0, 1.0, 1.0])
    module = torch.tensor([0, 0, 1, 1, 1])
    score = relative_importance(stat, costs, module)
    # the raw scale of a module does not matter, only a unit's standing within it
    torch.testing.assert_close(score[:2], torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(score[2:], torch.tensor([0.75, 2.25, 0.0], dtype=torch.float64))
    # a costlier unit of the same module is worth less per parameter
    uneven = relative_importance(torch.ones(2), torch.tensor([1.0, 3.0]), torch.zeros(2).long())
    assert uneven[0] > uneven[1]
    # an all-zero module scores 0, not NaN
    assert relative_importance(torch.zeros(2), torch.ones(2), torch.zeros(2).long()).eq(0).all()


def test_js_divergence_is_symmetric_bounded_and_zero_on_equal_rows():
    p = torch.randn(5, 11).log_softmax(-1)
    q = torch.randn(5, 11).log_softmax(-1)
    torch.testing.assert_close(js_divergence(p, p), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p))
    disjoint = torch.tensor([[0.0, -1e4], [-1e4, 0.0]])
    torch.testing.assert_close(
        js_divergence(disjoint[:1], disjoint[1:]), torch.tensor([math.log(2)])
    )


# ---- an attention sub-layer with no query head -----------------------------------------------


def _without_layer0_attention(model):
    adapter = adapter_for(model)
    keep = torch.ones(adapter.layout(model).n_units, dtype=torch.bool)
    keep[adapter.layout(model).modules[0].units] = False  # layer 0: every query head
    keep[10:30] = False  # and some neurons of layer 0
    return adapter, keep


def test_heads_can_be_emptied_only_when_asked():
    adapter = adapter_for(tiny_llama())
    assert adapter.min_units(HEADS) == 1 and adapter.min_units(HEADS, allow_empty=True) == 0
    assert adapter.min_units(NEURONS) == 0


def test_empty_attention_gives_the_masked_logits_and_generation(tokenizer):
    model = tiny_model(tokenizer)
    adapter, keep = _without_layer0_attention(model)
    ids = tokenizer(
        ["Natalia sold clips", "to 48 of her friends in April"], return_tensors="pt", padding=True
    )
    kwargs = {
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    with torch.no_grad():
        with adapter.apply_masks(model, keep):
            masked = model(**ids).logits
            masked_gen = model.generate(**ids, **kwargs)
        before = adapter.count_parameters(model)
        costs = adapter.unit_costs(model)
        adapter.slice(model, keep)
        sliced = model(**ids).logits
        sliced_gen = model.generate(**ids, **kwargs)
    assert isinstance(model.model.layers[0].self_attn, EmptyAttention)
    assert adapter.layout(model).modules[0].n_units == 0
    assert adapter.unit_costs(model).shape == (adapter.layout(model).n_units,)
    assert before - adapter.count_parameters(model) == pytest.approx(float(costs[~keep].sum()))
    torch.testing.assert_close(sliced, masked, atol=1e-5, rtol=1e-5)
    assert torch.equal(sliced_gen.sequences, masked_gen.sequences)
    for step_sliced, step_masked in zip(sliced_gen.logits, masked_gen.logits, strict=True):
        torch.testing.assert_close(step_sliced, step_masked, atol=1e-4, rtol=1e-4)


def test_empty_attention_keeps_the_cache_length_for_positions():
    """Token-by-token decoding with the cache equals one full forward (positions stay right)."""
    from transformers import DynamicCache

    model = tiny_llama()
    adapter, keep = _without_layer0_attention(model)
    adapter.slice(model, keep)
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        for t in range(5, 12):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_empty_attention_survives_save_and_reload(tmp_path, tokenizer):
    from bonsai_prune.models.pruned import load_pruned, save_model

    model = tiny_model(tokenizer)
    adapter, keep = _without_layer0_attention(model)
    adapter.slice(model, keep)
    save_model(tmp_path, model, tokenizer, adapter.structure(model))
    reloaded, _ = load_pruned(tmp_path)
    assert isinstance(reloaded.model.layers[0].self_attn, EmptyAttention)
    assert adapter.structure(reloaded) == adapter.structure(model)
    assert adapter.count_parameters(reloaded) == adapter.count_parameters(model)
    ids = torch.randint(3, 1000, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_obs_scores_a_neuron_another_duplicates_as_nearly_free_to_remove(tokenizer):
    """Two identical neurons: either can go, the other's refitted column writes for both.
    The share of a neuron's plain removal error that the refit cannot make up is smallest for
    them (a random tiny model's neurons are correlated, so others are partly made up too)."""
    from bonsai_prune.data.calibration import build_batch
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.methods.obs import obs_errors
    from bonsai_prune.models.compensation import Compensation, input_grams

    model = tiny_model(tokenizer)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[1] = proj.weight[0]  # neuron 1 = neuron 0
    adapter = adapter_for(model)
    batch = build_batch(tokenizer, load_gsm8k("train")[:2])
    text = Compensation(batch.input_ids, batch.attention_mask)
    errors = obs_errors(adapter, model, text)
    layout = adapter.layout(model)
    assert errors.shape == (layout.n_units,) and bool((errors >= 0).all())
    neurons = next(m for m in layout.modules if m.layer == 0 and m.kind == NEURONS)
    with torch.no_grad():
        gram = input_grams(model, {(0, NEURONS): mlp.down_proj}, text)[(0, NEURONS)].double()
    plain = gram.diagonal() * mlp.down_proj.weight.detach().double().pow(2).sum(0)  # no refit
    kept_share = errors[neurons.units] / plain  # (96,) what the refit cannot make up
    # the duplicates are the most replaceable neurons of the module, by far
    assert float(kept_share[:2].max()) < min(0.05, float(kept_share[2:].min()))
    assert float(kept_share[:2].max()) < 0.25 * float(kept_share[2:].median())
