"""The lean decoder with packed weights (oneDNN) against plain ones: ms per decode step.

    python scripts/packed_ab.py [--dtype fp32|bf16] [--rounds 3]

Dense and a random 50% slice of the packaged model, 1 and 16 rows (GSM8K test prompts),
128 steps each (generating 129 tokens minus generating 1: the prefill is not counted). Each
round times every case both ways, alternated, so load hits both alike; prints the median and
range per case, the packed/plain speed-up and whether both gave the same tokens.
"""

import argparse
import statistics
import time

import torch

from bonsai_prune.bench import slice_at_random
from bonsai_prune.data.prompts import format_prompt
from bonsai_prune.eval.gsm8k import first_problems
from bonsai_prune.models import adapter_for, decoding, load_model
from bonsai_prune.models.decoding import greedy_decode

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()
torch.manual_seed(0)
dense, tok = load_model("default", dtype=args.dtype)
pruned, _ = load_model("default", dtype=args.dtype)
slice_at_random(pruned, adapter_for(pruned), 0.5, 0)
tok.padding_side = "left"
prompts = [format_prompt(tok, p.question, "chat") for p in first_problems("test", 16)]
STEPS = 128
packs = decoding._packing_works()
if not packs:
    raise SystemExit("this torch build has no oneDNN packed linear: nothing to compare")


def decode(model, enc, n: int, packed: bool) -> tuple[torch.Tensor, float]:
    decoding._packing_works = (lambda: True) if packed else (lambda: False)
    decoding.release_fused(model)
    with torch.no_grad():
        greedy_decode(model, **enc, max_new_tokens=2, pad_token_id=tok.pad_token_id)  # build
        began = time.perf_counter()
        out = greedy_decode(model, **enc, max_new_tokens=n, pad_token_id=tok.pad_token_id)
        return out, time.perf_counter() - began


def step_ms(model, enc, packed: bool) -> tuple[torch.Tensor, float]:
    out, long = decode(model, enc, STEPS + 1, packed)
    _, short = decode(model, enc, 1, packed)
    return out, (long - short) / STEPS * 1000


cases = {}
for rows in (1, 16):
    enc = tok(prompts[:rows], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    for name, model in (("dense", dense), ("50%", pruned)):
        cases[(name, rows)] = (model, enc)
times = {key: {"plain": [], "packed": []} for key in cases}
same = dict.fromkeys(cases, True)
for _ in range(args.rounds):
    for key, (model, enc) in cases.items():
        plain_out, plain_ms = step_ms(model, enc, packed=False)
        packed_out, packed_ms = step_ms(model, enc, packed=True)
        times[key]["plain"].append(plain_ms)
        times[key]["packed"].append(packed_ms)
        same[key] &= torch.equal(plain_out, packed_out)
print(f"{args.dtype}, {args.rounds} rounds, {STEPS} steps; ms per step, median [min-max]")
for (name, rows), t in times.items():
    plain, packed = statistics.median(t["plain"]), statistics.median(t["packed"])
    print(
        f"{name:>5}, {rows:>2} rows: plain {plain:6.1f} [{min(t['plain']):.1f}-{max(t['plain']):.1f}]"
        f"  packed {packed:6.1f} [{min(t['packed']):.1f}-{max(t['packed']):.1f}]"
        f"  x{plain / packed:.2f}  same tokens: {same[(name, rows)]}"
    )
for rows in (1, 16):
    for kind in ("plain", "packed"):
        d = statistics.median(times[("dense", rows)][kind])
        p = statistics.median(times[("50%", rows)][kind])
        print(f"50% over dense, {rows:>2} rows, {kind}: {d / p:.2f}x")
