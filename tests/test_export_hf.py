"""A pruned folder loads with plain transformers (remote code or a stock config), without this
package, and gives the tokens ``load_pruned`` gives; files are shared-readable."""

from __future__ import annotations

import json
import os
import site
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.models.pruned import load_pruned, save_model

PROMPT = [[5, 9, 17, 33, 2, 7, 40, 41]]


def _tokenizer(tmp_path: Path):
    """A tiny word-level tokenizer matching the tiny model's 128-token vocabulary."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
        pad_token="t0",
        eos_token="t1",
        bos_token="t2",
        unk_token="t3",
    )
    return tok


def _pruned(uneven: bool = True, seed: int = 1):
    """Tiny 3-layer Llama: layer 0 loses every head, layer 1 one head (groups 1+2), MLPs 56/89
    wide; or (uneven=False) every layer loses its second K/V group and the same 40 neurons."""
    model = tiny_llama(seed=seed, layers=3)
    with torch.no_grad():  # larger weights, so greedy tokens vary instead of repeating one token
        for p in model.parameters():
            p.mul_(4.0)
    adapter = adapter_for(model)
    layout = adapter.layout(model)
    keep = torch.ones(layout.n_units, dtype=torch.bool)
    for m in layout.modules:
        if uneven:
            if m.name == "layer0.heads":
                keep[m.units] = False
            if m.name == "layer1.heads":
                keep[m.offset] = False
            if m.name == "layer1.neurons":
                keep[m.offset : m.offset + 40] = False
            if m.name == "layer2.neurons":
                keep[m.offset : m.offset + 7] = False
        elif m.kind == "heads":
            keep[m.offset + 2 : m.offset + 4] = False
        else:
            keep[m.offset : m.offset + 40] = False
    adapter.slice(model, keep)
    return model, adapter.structure(model)


def _greedy(model, use_cache: bool = True, n: int = 16) -> list[int]:
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache)
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture
def uneven_folder(tmp_path):
    model, structure = _pruned(uneven=True)
    model.generation_config.max_new_tokens = 7
    folder = save_model(tmp_path / "run", model, _tokenizer(tmp_path), structure)
    return model, folder


def test_uneven_folder_writes_remote_code_and_shared_files(uneven_folder):
    _, folder = uneven_folder
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bonsai_llama"
    assert config["layer_query_heads"] == [0, 3, 4]
    assert config["layer_kv_head_index"][1] == [0, 1, 1]
    assert config["layer_intermediate_sizes"] == [96, 56, 89]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.iterdir()]:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_remote_code_matches_load_pruned_with_and_without_cache(uneven_folder):
    model, folder = uneven_folder
    loaded, _ = load_pruned(folder)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(remote).__name__ == "BonsaiLlamaForCausalLM"
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, model(ids).logits)
    expected = _greedy(model)
    assert len(set(expected)) > 1  # the check means something only if tokens vary
    assert _greedy(loaded) == expected
    # first attention layer emptied: the KV cache must still count the tokens
    assert _greedy(remote, use_cache=True) == expected
    assert _greedy(remote, use_cache=False) == expected


def test_generation_config_applies_on_reload(uneven_folder):
    _, folder = uneven_folder
    loaded, _ = load_pruned(folder)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert loaded.generation_config.max_new_tokens == 7
    assert remote.generation_config.max_new_tokens == 7


def test_save_pretrained_of_remote_model_round_trips(uneven_folder, tmp_path):
    _, folder = uneven_folder
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    remote.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "modeling_bonsai_llama.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, remote(ids).logits)


def test_load_pruned_builds_no_dense_layer(uneven_folder, monkeypatch):
    _, folder = uneven_folder
    built = []
    real_init = torch.nn.Linear.__init__

    def spy(self, in_features, out_features, *args, **kwargs):
        built.append((in_features, out_features, str(kwargs.get("device"))))
        real_init(self, in_features, out_features, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    load_pruned(folder)
    dense_mlp = [b for b in built if 96 in b[:2] and b[2] != "meta"]
    assert built and not dense_mlp  # layer 0 keeps 96 neurons, but only as a meta shape


def test_uniform_layers_write_a_stock_config(tmp_path):
    model, structure = _pruned(uneven=False)
    folder = save_model(tmp_path / "run", model, _tokenizer(tmp_path), structure)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert config["intermediate_size"] == 56
    assert not list(folder.glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()  # no remote code
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert _greedy(stock) == _greedy(model) == _greedy(load_pruned(folder)[0])


def _site_packages_without_this_package() -> list[str]:
    """sys.path entries of this venv's site-packages; .pth files (the editable install of
    bonsai_prune among them) are not processed under ``python -S``."""
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def test_folder_loads_where_bonsai_prune_is_not_importable(uneven_folder, tmp_path):
    model, folder = uneven_folder
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path[:] = [p for p in sys.path if "bonsai" not in p] + {_site_packages_without_this_package()!r}
        try:
            import bonsai_prune
            print(json.dumps({{"error": "bonsai_prune importable: " + bonsai_prune.__file__}}))
            sys.exit(0)
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        AutoTokenizer.from_pretrained({str(folder)!r}, trust_remote_code=True)
        ids = torch.tensor({PROMPT!r})
        out = {{}}
        for cache in (True, False):
            g = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=cache)
            out[str(cache)] = g[0, ids.shape[1]:].tolist()
        print(json.dumps(out))
        """
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,  # generous: shared CI machines run it 10x slower than idle
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in result, result
    expected = _greedy(model)
    assert result["True"] == expected
    assert result["False"] == expected
