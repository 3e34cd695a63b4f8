"""Batch-1 decode, fp32, dense vs a random 50% slice: the lean decoder and transformers' generate.

    python scripts/decode_ab.py

Five rounds, each timing both decoders on both models (so load hits all alike); prints the
median ms/token with its range and the pruned/dense speed-up per round.
"""

import statistics
import time

import torch

from bonsai_prune.bench.slicing import bench_prompts, slice_at_random
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.decoding import greedy_decode

torch.manual_seed(0)
dense, tok = load_model("default", dtype="fp32")
pruned, _ = load_model("default", dtype="fp32")
slice_at_random(pruned, adapter_for(pruned), 0.5, 0)
enc = tok(bench_prompts(tok)[:1], return_tensors="pt", add_special_tokens=False)
N = 64


def lean(m):
    return greedy_decode(
        m, enc["input_ids"], enc["attention_mask"], N, pad_token_id=tok.pad_token_id
    )


def hf(m):
    return m.generate(
        **enc, max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id
    )


def t(fn, m):
    with torch.no_grad():
        b = time.perf_counter()
        fn(m)
        return (time.perf_counter() - b) / N * 1000


for f in (lean, hf):
    t(f, dense)
    t(f, pruned)
res = {k: [] for k in ("lean dense", "lean 50%", "hf dense", "hf 50%")}
for _round in range(5):
    for name, f in (("lean", lean), ("hf", hf)):
        res[f"{name} dense"].append(t(f, dense))
        res[f"{name} 50%"].append(t(f, pruned))
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.1f} ms/token (min {min(v):.1f}, max {max(v):.1f})")
for name in ("lean", "hf"):
    r = sorted(d / p for d, p in zip(res[f"{name} dense"], res[f"{name} 50%"], strict=True))
    print(f"{name} speed-up 50%: median {statistics.median(r):.2f}x [{r[0]:.2f}-{r[-1]:.2f}]")
print(
    "lean dense vs hf dense:",
    statistics.median(res["hf dense"]) / statistics.median(res["lean dense"]),
)
