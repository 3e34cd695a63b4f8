"""Recovery (distillation from the dense parent) on tiny random models with the packaged tokenizer."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from bonsai_prune.data.problems import Problem
from bonsai_prune.errors import (
    BonsaiPruneError,
    ConfigError,
    MemoryBudgetError,
    ModelLoadError,
    RunDirectoryError,
)
from bonsai_prune.models import adapter_for
from bonsai_prune.models.pruned import MODEL_DIR, load_pruned, save_model
from bonsai_prune.recover import RecoverConfig, recover
from bonsai_prune.recover import data as rdata
from bonsai_prune.recover.data import Sequence, collate, encode, plan_batches, split_held_out
from bonsai_prune.recover.loss import distill_kl, recovery_loss
from bonsai_prune.recover.step_memory import HEADROOM, probe_step_memory
from bonsai_prune.recover.trainer import accumulate_gradients, lr_factor, micro_batches
from bonsai_prune.rundir.files import atomic_write_json

FAST = {
    "max_tokens": 1200,
    "batch_size": 2,
    "max_length": 96,
    "n_eval": 2,
    "dtype": "fp32",
    "lr": 1e-3,
    "warmup_steps": 1,
    "data": "gold",  # self data (the default) generates with the parent: its own tests below
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The shared cache of parent solutions goes under the test's folder, not ~/.cache."""
    monkeypatch.setattr(
        importlib.import_module("bonsai_prune.recover"), "cache_dir", lambda: tmp_path / "cache"
    )


# ---- pure functions ------------------------------------------------------------------------


def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    assert float(distill_kl(t, t)) == pytest.approx(0.0, abs=1e-6)
    for temp in (1.0, 2.0):
        p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
        expected = (p * (p.log() - q.log())).sum(-1).mean() * temp**2
        assert float(distill_kl(s, t, temp)) == pytest.approx(float(expected), rel=1e-5)


def test_recovery_loss_weights_its_terms():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2])
    loss, kl, ce = recovery_loss(s, t, labels, temperature=1.0, kl_weight=2.0, ce_weight=0.5)
    assert float(loss) == pytest.approx(2 * float(kl) + 0.5 * float(ce))
    assert float(ce) == pytest.approx(float(torch.nn.functional.cross_entropy(s, labels)))
    only_ce, kl0, _ = recovery_loss(s, None, labels, temperature=1.0, kl_weight=0.0, ce_weight=1.0)
    assert float(kl0) == 0.0 and float(only_ce) == pytest.approx(float(ce))


def test_plan_spends_the_budget_without_repeats_within_an_epoch():
    lengths = [10, 20, 30, 40, 50]
    plan = plan_batches(lengths, batch_size=2, max_tokens=120, seed=3)
    assert plan == plan_batches(lengths, batch_size=2, max_tokens=120, seed=3)
    assert plan != plan_batches(lengths, batch_size=2, max_tokens=120, seed=4)
    rows = [i for b in plan for i in b]
    spent = sum(lengths[i] for i in rows)
    assert spent >= 120 and spent - lengths[rows[-1]] < 120  # stops at the first step past it
    longer = [i for b in plan_batches(lengths, 2, 400, seed=3) for i in b]
    assert sorted(longer[:5]) == list(range(5)) and sorted(longer[5:10]) == list(range(5))


def test_plan_groups_rows_of_similar_length():
    lengths = [10 * (i % 7 + 1) for i in range(64)]
    plan = plan_batches(lengths, batch_size=4, max_tokens=sum(lengths), seed=0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    unsorted = plan_batches(lengths, batch_size=4, max_tokens=sum(lengths), seed=0, bucket=1)
    padded_unsorted = sum(len(b) * max(lengths[i] for i in b) for b in unsorted)
    assert sorted(i for b in plan for i in b) == list(range(64))
    assert padded < 0.85 * padded_unsorted


def test_lr_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, 20, 4, 0.1) for s in range(20)]
    assert f[0] < f[1] < f[3] < f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    assert f[-1] == pytest.approx(0.1)


def test_held_out_problems_never_train():
    problems = [Problem(f"q{i}", f"a {i}\n#### {i}") for i in range(20)]
    train, held = split_held_out(problems, 5, seed=0)
    assert len(held) == 5 and len(train) == 15
    assert not {p.question for p in held} & {p.question for p in train}


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="max_tokens"):
        RecoverConfig(max_tokens=0)
    with pytest.raises(ConfigError, match="nothing to train"):
        RecoverConfig(kl_weight=0.0, ce_weight=0.0)
    with pytest.raises(ConfigError, match="unknown RecoverConfig field"):
        RecoverConfig.from_dict({"max_token": 5})
    assert RecoverConfig.from_dict(RecoverConfig(lr=1e-4).to_dict()) == RecoverConfig(lr=1e-4)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        RecoverConfig(micro_batch_size=-1)


def test_micro_batching_keeps_the_cache_keys_and_saved_runs_of_whole_batches():
    """Runs saved before micro-batching existed trained on whole batches: their saved config
    reads back equal, and a key hashes the new field only where it is set."""
    saved = {k: v for k, v in RecoverConfig().to_dict().items() if k != "micro_batch_size"}
    assert RecoverConfig.from_saved(saved) == RecoverConfig()
    assert RecoverConfig().identity() == saved
    assert RecoverConfig(micro_batch_size=2).identity() != saved


def test_micro_batches_split_a_step_in_order():
    rows = [Sequence((i,), 0) for i in range(5)]
    assert micro_batches(rows, 0) == [rows] == micro_batches(rows, 5) == micro_batches(rows, 9)
    assert micro_batches(rows, 2) == [rows[:2], rows[2:4], rows[4:]]


def test_micro_batched_gradients_add_up_to_the_whole_batch():
    """A step in micro-batches weights each part's token mean by its share of the step's scored
    tokens: the same loss and gradients as the whole batch (rows of unequal lengths)."""
    teacher, student = tiny_llama(seed=1).eval(), tiny_llama(seed=2)
    rows = [Sequence(tuple(range(3, 3 + n)), 2) for n in (9, 5, 12, 7, 6)]
    config = RecoverConfig(**{**FAST, "ce_weight": 0.5})
    figures, grads = [], []
    for size in (0, 2):
        student.zero_grad(set_to_none=True)
        batches = [collate(part, 0) for part in micro_batches(rows, size)]
        loss, kl, ce, _ = accumulate_gradients(student, teacher, batches, config, None)
        figures.append((loss, kl, ce))
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert figures[0] == pytest.approx(figures[1], rel=1e-5)
    for name, whole in grads[0].items():
        torch.testing.assert_close(grads[1][name], whole, rtol=1e-4, atol=1e-6)


# ---- tiny models -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_targets_are_the_solution_and_eos(tokenizer):
    problem = Problem("What is 2+3?", "2+3=<<2+3=5>>5\n#### 5")
    seq = encode(tokenizer, problem, "2+3=5\n#### 5", "chat", 512)
    batch = collate([seq, encode(tokenizer, problem, "5", "chat", 512)], tokenizer.pad_token_id)
    solution = tokenizer("2+3=5\n#### 5", add_special_tokens=False)["input_ids"]
    assert batch.labels[: len(solution) + 1].tolist() == solution + [tokenizer.eos_token_id]
    assert int(batch.target_mask[0].sum()) == len(solution) + 1
    assert batch.n_tokens == len(seq.ids) + len(encode(tokenizer, problem, "5", "chat", 512).ids)


@pytest.fixture(scope="module")
def parent_and_run(tmp_path_factory, tokenizer):
    """A tiny dense parent folder and a run directory holding a sliced copy of it."""
    root = tmp_path_factory.mktemp("parent")
    dense = tiny_llama(seed=0)
    dense.resize_token_embeddings(len(tokenizer))
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    adapter = adapter_for(dense)
    keep = torch.ones(adapter.layout(dense).n_units, dtype=torch.bool)
    keep[torch.tensor([1, 6, 7, 40, 41, 42, 150, 151, 152, 153])] = False
    adapter.slice(dense, keep)
    run = root / "run"
    save_model(run, dense, tokenizer, adapter.structure(dense))
    atomic_write_json(run / "config.json", {"model": str(root / "dense")})
    return root / "dense", run


def _weights(folder):
    model, _ = load_pruned(folder)
    return dict(model.state_dict())


def test_recovery_lowers_held_out_kl_and_keeps_the_structure(parent_and_run, tmp_path):
    _, run = parent_and_run
    config = RecoverConfig(**FAST, eval_every=3)
    result = recover(run, tmp_path / "out", config, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["complete"] is True and result.complete
    assert report["evals"][0]["step"] == 0 and report["best"]["kl"] < report["evals"][0]["kl"]
    assert report["tokens"] >= config.max_tokens and report["tokens_per_second"] > 0
    assert not (tmp_path / "out" / "checkpoints").exists()
    before, after = _weights(run), _weights(tmp_path / "out")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    embed = "model.embed_tokens.weight"
    assert torch.equal(before[embed], after[embed])  # frozen by default


def test_resumed_run_ends_with_the_same_weights(parent_and_run, tmp_path):
    _, run = parent_and_run
    config = RecoverConfig(**FAST, eval_every=2, checkpoint_every=100)
    recover(run, tmp_path / "whole", config, progress=False)
    n_steps = json.loads((tmp_path / "whole" / "report.json").read_text())["n_steps"]
    assert n_steps >= 4
    part = recover(run, tmp_path / "split", config, stop_after_step=n_steps // 2, progress=False)
    assert not part.complete and not (tmp_path / "split" / MODEL_DIR).exists()
    assert json.loads((tmp_path / "split" / "report.json").read_text())["complete"] is False
    with pytest.raises(RunDirectoryError, match="not empty"):
        recover(run, tmp_path / "split", config, progress=False)
    with pytest.raises(RunDirectoryError, match="different settings"):
        recover(run, tmp_path / "split", RecoverConfig(**{**FAST, "lr": 2e-3}), resume=True)
    recover(run, tmp_path / "split", config, resume=True, progress=False)
    whole, split = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_self_data_is_generated_once_and_reused_on_resume(parent_and_run, tmp_path, monkeypatch):
    _, run = parent_and_run
    config = RecoverConfig(**{**FAST, "max_tokens": 400, "data": "self"}, self_max_new_tokens=8)
    recover(run, tmp_path / "out", config, stop_after_step=1, progress=False)
    cache = (tmp_path / "out" / "self_data.jsonl").read_text().splitlines()
    assert cache and all(json.loads(line)["solution"] is not None for line in cache)

    def no_generation(*args, **kwargs):
        raise AssertionError("self data generated again on resume")

    monkeypatch.setattr(rdata, "_generate", no_generation)
    assert recover(run, tmp_path / "out", config, resume=True, progress=False).complete


def test_parent_solutions_are_shared_by_runs_of_one_parent(parent_and_run, tmp_path, monkeypatch):
    # the parent's greedy solutions do not depend on the pruned model: a second recovery from
    # the same parent (another sparsity, another utility) reads them instead of generating
    _, run = parent_and_run
    config = RecoverConfig(**{**FAST, "max_tokens": 400, "data": "self"}, self_max_new_tokens=8)
    recover(run, tmp_path / "first", config, progress=False)
    shared = list((tmp_path / "cache" / "self_data").glob("*.jsonl"))
    assert len(shared) == 1 and shared[0].read_text().strip()

    def no_generation(*args, **kwargs):
        raise AssertionError("the parent's solutions were generated again")

    monkeypatch.setattr(rdata, "_generate", no_generation)
    assert recover(run, tmp_path / "second", config, progress=False).complete
    first = (tmp_path / "first" / "self_data.jsonl").read_text()
    assert (tmp_path / "second" / "self_data.jsonl").read_text() == first


def test_bad_inputs_fail_in_one_line_and_write_nothing_complete(
    parent_and_run, tmp_path, tokenizer
):
    dense, run = parent_and_run
    with pytest.raises(RunDirectoryError, match="holds no pruned model"):
        recover(tmp_path, tmp_path / "a", RecoverConfig(**FAST), progress=False)
    other = tmp_path / "other"
    model = tiny_llama(seed=1)
    model.resize_token_embeddings(len(tokenizer) + 1)
    model.save_pretrained(other)
    tok = tokenizer.__class__.from_pretrained(dense)
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(other)
    with pytest.raises(ModelLoadError, match="tokenizer differs") as err:
        recover(run, tmp_path / "b", RecoverConfig(**FAST), teacher=str(other), progress=False)
    assert "\n" not in str(err.value) and isinstance(err.value, BonsaiPruneError)
    assert not (tmp_path / "b").exists()


def test_lora_merges_into_a_plain_pruned_model(parent_and_run, tmp_path):
    pytest.importorskip("peft")
    _, run = parent_and_run
    config = RecoverConfig(**{**FAST, "max_tokens": 600}, train="lora", lora_rank=4, eval_every=0)
    recover(run, tmp_path / "out", config, progress=False)
    before, after = _weights(run), _weights(tmp_path / "out")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(
        json.loads((tmp_path / "out" / "report.json").read_text())["history"][-1]["loss"]
    )


def test_recover_and_export_run_from_the_command_line(parent_and_run, tmp_path, capsys):
    # both commands take a positional RUN: it must not shadow the command's handler
    from bonsai_prune.cli import main

    _, run = parent_and_run
    options = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]
    assert main(["recover", str(run), "--out", str(tmp_path / "rec"), "--quiet", *options]) == 0
    assert json.loads((tmp_path / "rec" / "report.json").read_text())["complete"] is True
    out = tmp_path / "task"
    assert (
        main(["export", str(tmp_path / "rec"), "--format", "lm-eval-task", "--out", str(out)]) == 0
    )
    assert str(tmp_path / "rec") in capsys.readouterr().out and any(out.rglob("*.yaml"))


def test_the_packaged_parent_is_named_in_the_solutions_cache_by_its_gguf_not_its_copy():
    """The de-quantised copy of the packaged model is remade, with new file times, on every
    fresh machine; its solutions kept from before (results/study/self_data/) must still be
    found, so the cache names the packaged GGUF by name and size, never the copy's files."""
    from bonsai_prune.models.loading import packaged_gguf
    from bonsai_prune.recover import _teacher_identity
    from bonsai_prune.recover.data import shared_self_cache

    gguf = packaged_gguf()
    identity = _teacher_identity("default")
    assert identity == f"default:{gguf.name}:{gguf.stat().st_size}"
    assert not Path(identity).exists() and _teacher_identity("some/folder") == "some/folder"
    path = shared_self_cache(Path("root"), identity, "chat", 256, "torch.bfloat16")
    assert path == Path("root") / "e1265ff93f4cde4bba97.jsonl"  # the study's kept solutions


def _free(monkeypatch, value):
    monkeypatch.setattr(
        importlib.import_module("bonsai_prune.recover"), "available_memory", lambda: value
    )


def test_a_step_the_free_memory_cannot_hold_is_split(parent_and_run, tmp_path, monkeypatch, capsys):
    dense, run = parent_and_run
    config = RecoverConfig(**{**FAST, "batch_size": 4, "max_tokens": 600}, eval_every=0)
    # the estimate counts the process's resident memory once more: held still here
    monkeypatch.setattr(
        importlib.import_module(probe_step_memory.__module__), "resident_bytes", lambda: 2**28
    )
    student, _ = load_pruned(run)
    memory = probe_step_memory(student.float(), torch.float32, config, None)
    _free(monkeypatch, int((memory.step_bytes(2) + memory.row_bytes // 2) / HEADROOM))
    recover(run, tmp_path / "out", config)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["complete"] and report["micro_batch_size_used"] == 2
    assert "2 rows at a time" in capsys.readouterr().err
    assert report["config"]["micro_batch_size"] == 0  # the setting the user gave is kept


def test_a_step_that_cannot_fit_is_refused_before_anything_is_written(
    parent_and_run, tmp_path, monkeypatch
):
    _, run = parent_and_run
    _free(monkeypatch, 1024)
    with pytest.raises(MemoryBudgetError, match="are free: free memory, lower --max-length") as e:
        recover(run, tmp_path / "out", RecoverConfig(**FAST), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    # a micro-batch size the user sets is taken as given
    recover(
        run,
        tmp_path / "set",
        RecoverConfig(**{**FAST, "max_tokens": 300}, micro_batch_size=1),
        progress=False,
    )
    assert json.loads((tmp_path / "set" / "report.json").read_text())["micro_batch_size_used"] == 1
