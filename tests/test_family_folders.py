"""``bonsai-prune prune --model FOLDER`` on local Hugging Face folders of non-Llama families.

Each folder holds a tiny random model of the family (from tests/test_adapter_contract.py) and
the packaged model's tokenizer, the cheapest real tokenizer here; the model takes its vocab size.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_adapter_contract import build

from bonsai_prune.cli import main
from bonsai_prune.models import adapter_for, load_model


def family_folder(path, family: str, default_model_dir):
    """Save a tiny random ``family`` model with the packaged tokenizer into ``path``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = build(
        family,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# the two whose adapters differ most from Llama: fused projections; soft-capped eager attention
@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_cli_prunes_a_local_folder_of_the_family(tmp_path, family, default_model_dir, capsys):
    folder = family_folder(tmp_path / family, family, default_model_dir)
    out = tmp_path / "run"
    argv = ["prune", "--model", str(folder), "--method", "wanda", "--sparsity", "0.3"]
    argv += ["--calib-samples", "2", "--dtype", "fp32", "--out", str(out), "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    model, tokenizer = load_model(str(out), dtype="fp32")
    adapter = adapter_for(model)
    assert adapter.structure(model)["family"] == model.config.model_type == family
    assert adapter.count_parameters(model) == report["params_after"] < report["params_before"]
    batch = tokenizer(
        ["Natalia sold clips", "to 48 of her friends"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (2, batch["input_ids"].shape[1] + 4)


def test_unsupported_family_fails_before_loading_weights(tmp_path, capsys):
    """A folder whose config names an unknown family: no weights file is even looked for."""
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    argv = ["prune", "--model", str(folder), "--method", "wanda", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "phi3" in err and "qwen2" in err
