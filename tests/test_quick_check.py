"""The closing check of ``prune``: dense against pruned, measured on held-out problems."""

from __future__ import annotations

import copy
import math

import torch
from conftest import tiny_llama_for

from bonsai_prune.eval.quick import format_check, quick_check
from bonsai_prune.models import adapter_for


def test_quick_check_measures_both_models_and_prints_the_next_commands(tokenizer):
    dense = tiny_llama_for(tokenizer)
    pruned = copy.deepcopy(dense)
    adapter = adapter_for(pruned)
    keep = torch.ones(adapter.layout(pruned).n_units, dtype=torch.bool)
    keep[adapter.layout(pruned).modules[1].units.start :][:40] = False  # 40 neurons of layer 0
    adapter.slice(pruned, keep)
    check = quick_check(
        {"dense": (dense, tokenizer), "pruned": (pruned, tokenizer)},
        n_problems=2,
        decode_tokens=4,
        repeats=1,
    )
    assert set(check.perplexity) == {"dense", "pruned"}
    assert all(math.isfinite(v) and v > 1 for v in check.perplexity.values())
    assert check.perplexity["dense"] != check.perplexity["pruned"]  # the pruned model differs
    assert all(v > 0 for v in check.decode_tokens_per_s.values()) and check.speedup > 0
    tps = check.decode_tokens_per_s  # one repeat: its ratio is the median of the ratios
    assert check.speedup == tps["pruned"] / tps["dense"]
    text = format_check(check, "runs/x")
    assert "reference perplexity: dense" in text and "bonsai-prune evaluate --model runs/x" in text
    assert "bonsai-prune compare runs/x/eval --baseline runs/x/eval-dense" in text
