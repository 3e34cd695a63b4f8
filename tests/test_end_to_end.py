"""End to end on the real packaged SmolLM2-135M-Instruct with tiny settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from bonsai_prune import PruneConfig, UtilityConfig, adapter_for, load_model, load_pruned, prune

pytestmark = pytest.mark.slow  # every test here loads the real packaged model

TINY = {
    "sparsity": 0.08,
    "prune_fraction": 0.08,
    "masks_per_round": 4,
    "calib_samples": 2,
    "tolerance": 0.01,
}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, default_model_dir):
    out = tmp_path_factory.mktemp("run")
    config = PruneConfig(**TINY, utility=UtilityConfig(name="perplexity"))
    return prune(config, out_dir=out, progress=False), out


def test_run_directory_reloads_a_smaller_model_that_generates_the_same(pruned_run):
    result, out = pruned_run
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True
    assert report["params_after"] < report["params_before"]
    assert report["sparsity"] == pytest.approx(TINY["sparsity"], abs=TINY["tolerance"])

    model, tokenizer = load_pruned(out)
    adapter = adapter_for(model)
    assert adapter.count_parameters(model) == report["params_after"]
    ids = tokenizer(["Natalia sold clips to 48 of her friends."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        assert bool(torch.isfinite(logits).all())
        kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(model.generate(**ids, **kwargs), result.model.generate(**ids, **kwargs))


def test_round_files_hold_masks_and_coefficients(pruned_run):
    from bonsai_prune.rundir.run import load_round

    result, out = pruned_run
    tensors, figures = load_round(out, 1)
    assert tensors["masks"].shape == (TINY["masks_per_round"], tensors["keep"].shape[0])
    assert torch.isinf(tensors["beta"][~tensors["candidates"]]).all()
    assert figures["params_after"] == result.rounds[0].params_after


def test_loading_a_run_directory_as_a_model_spec(pruned_run):
    _, out = pruned_run
    model, _ = load_model(str(out))
    assert adapter_for(model).count_parameters(model) < 106_203_456


def test_cli_prunes_with_u_dagger(tmp_path, default_model_dir):
    out = tmp_path / "cli-run"
    command = [
        sys.executable,
        "-m",
        "bonsai_prune.cli",
        "prune",
        "--out",
        str(out),
        "--quiet",
        "--utility",
        "comprehensive",
        "--weights",
        "acc=34,lex=33,sem=33",
        "--gen-tokens",
        "8",
        "--sparsity",
        "0.05",
        "--prune-frac",
        "0.05",
        "--masks-per-round",
        "2",
        "--calib-samples",
        "2",
        "--tolerance",
        "0.01",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sparsity reached" in done.stdout
    # the closing check: held-out perplexity and decode speed, dense -> pruned, measured
    check = re.search(r"reference perplexity: dense ([\d.]+) -> pruned ([\d.]+)", done.stdout)
    assert check, done.stdout
    # pruning costs a little (at 5% with compensation, under the printed 0.01)
    assert 1.0 < float(check.group(1)) <= float(check.group(2)) < 100
    assert re.search(r"decode: dense [\d.]+ -> pruned [\d.]+ tokens/s", done.stdout)
    assert f"bonsai-prune evaluate --model {out}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["config"]["utility"]["name"] == "comprehensive"
    assert 0 <= report["rounds"][0]["utility_before"] <= 100
