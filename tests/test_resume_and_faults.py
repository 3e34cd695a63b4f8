"""Resume after SIGKILL, atomic reports, and sub-models whose logits are NaN."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from bonsai_prune import PruneConfig, PruningError, UtilityConfig, prune
from bonsai_prune.utility.perplexity import PerplexityUtility

ARGS = [
    "prune",
    "--quiet",
    "--no-check",
    "--sparsity",
    "0.12",
    "--prune-frac",
    "0.04",
    "--masks-per-round",
    "4",
    "--calib-samples",
    "2",
    "--tolerance",
    "0.005",
    "--seed",
    "3",
    "--compensate-samples",  # the resumed run replays compensated slices; 4 problems keep it quick
    "4",
]


def _cli(*extra: str) -> list[str]:
    return [sys.executable, "-m", "bonsai_prune.cli", *ARGS, *extra]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_model(tmp_path, default_model_dir):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli("--out", str(whole)), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(
        _cli("--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (killed / "rounds" / "round_001.json").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before round 1"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)  # round 1 is on disk; round 2 has begun or is about to
    process.wait()
    assert json.loads((killed / "report.json").read_text())["complete"] is False
    assert not (killed / "model").exists()

    done = subprocess.run(
        _cli("--out", str(killed), "--resume"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((killed / "report.json").read_text())
    assert report["complete"] is True and report["resumed_after_round"] >= 1
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    figures = ("params_after", "sparsity", "utility_per_round", "n_rounds")
    assert {k: report[k] for k in figures} == {
        k: json.loads((whole / "report.json").read_text())[k] for k in figures
    }


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    from bonsai_prune.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(PruneConfig(sparsity=0.2).to_dict()))
    assert main(["prune", "--out", str(out), "--resume", "--sparsity", "0.3"]) == 2
    assert "different settings (sparsity)" in capsys.readouterr().err


def test_a_run_saved_before_a_setting_existed_reads_as_what_it_ran(tmp_path, capsys):
    # runs saved before --beta-prior existed ran with one penalty for every unit ("uniform");
    # resuming one with today's default must be refused, not silently switch designs
    from bonsai_prune.cli import main

    saved = PruneConfig(sparsity=0.2).to_dict()
    del saved["beta_prior"]
    assert PruneConfig.from_saved(saved).beta_prior == "uniform"
    assert PruneConfig.from_dict(saved).beta_prior == "cost"  # a new spec takes the default
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(saved))
    assert main(["prune", "--out", str(out), "--resume", "--sparsity", "0.2"]) == 2
    assert "different settings (beta_prior)" in capsys.readouterr().err


def _nan_when_last_head_is_masked(model):
    """A broken sub-model: removing head 3 of layer 0 turns its rows' logits into NaN."""
    attn = model.model.layers[0].self_attn

    def hook(module, args, output):  # per row: a batch may hold several sub-models
        head = args[0][..., 3 * attn.head_dim : 4 * attn.head_dim]  # (B, S, head_dim)
        broken = (head == 0).flatten(1).all(1)  # (B,) rows whose sub-model lacks head 3
        return torch.where(broken[:, None, None], output * math.nan, output)

    return attn.o_proj.register_forward_hook(hook)


def test_nan_sub_models_get_the_worst_utility_and_are_counted(tokenizer):
    model = tiny_llama(seed=1)
    model.resize_token_embeddings(len(tokenizer))
    handle = _nan_when_last_head_is_masked(model)
    # uniform prior: ties fix the lower-index heads, so heads 2 and 3 are the candidates
    config = PruneConfig(
        sparsity=0.25,
        prune_fraction=0.25,
        masks_per_round=16,
        calib_samples=2,
        prior="uniform",
        utility=UtilityConfig(name="perplexity"),
    )
    result = prune(config, model=model, tokenizer=tokenizer, progress=False)
    handle.remove()
    first = result.rounds[0]
    broken = ~first.masks[:, 3]  # (N,) sub-models without head 3 of layer 0
    expected = int(broken.sum())
    assert expected > 0, "no sampled mask removed the broken head"
    assert first.n_failed == expected == result.report["rounds"][0]["n_failed"]
    assert torch.isnan(first.scores[broken]).all() and torch.isfinite(first.scores[~broken]).all()


def test_every_sub_model_failing_stops_and_keeps_completed_rounds(tokenizer, tmp_path):
    model = tiny_llama(seed=2)
    model.resize_token_embeddings(len(tokenizer))
    perplexity, calls = PerplexityUtility(), []

    def breaks_after_round_one(model, batch):
        calls.append(1)
        return perplexity(model, batch) if len(calls) <= 9 else math.nan  # round 1: 1 + 8 calls

    config = PruneConfig(sparsity=0.3, prune_fraction=0.1, masks_per_round=8, calib_samples=2)
    with pytest.raises(PruningError, match="every sub-model .* non-finite"):
        prune(
            config,
            model=model,
            tokenizer=tokenizer,
            utility=breaks_after_round_one,
            out_dir=tmp_path,
            progress=False,
        )
    assert (tmp_path / "rounds" / "round_001.json").exists()
    assert not (tmp_path / "rounds" / "round_002.json").exists()
    assert json.loads((tmp_path / "report.json").read_text())["complete"] is False
