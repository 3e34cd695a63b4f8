"""The lean decoder at a git revision against the working tree's: ms per decode step.

    python scripts/lean_ab.py [--rev HEAD] [--dtype fp32] [--rounds 10]

Batch 1, the packaged model dense and a random 50% slice (``bench``'s), 48 new tokens; a step is
(time for 48 tokens - time for 1) / 47, so the prefill is left out. Both versions of
``models/decoding.py`` are loaded in one process and timed in alternated order each round; the
greedy tokens of the two must be equal (the script stops otherwise). Prints the median ms per
step with its range, each version's pruned/dense speed-up, and old/new per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bonsai_prune.bench.slicing import bench_prompts, slice_at_random
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models import decoding as current

N = 48
CEILING = 1.65  # the packaged model at 50%: its tied embedding is not pruned


def module_at(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:src/bonsai_prune/models/decoding.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "decoding_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("decoding_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    dense, tok = load_model("default", dtype=args.dtype)
    pruned, _ = load_model("default", dtype=args.dtype)
    slice_at_random(pruned, adapter_for(pruned), 0.5, 0)
    enc = tok(bench_prompts(tok)[:1], return_tensors="pt", add_special_tokens=False)
    models = {"dense": dense, "50%": pruned}
    codes = {args.rev: module_at(args.rev), "working tree": current}

    def decode(code, model, n: int) -> tuple[float, torch.Tensor]:
        with torch.no_grad():
            started = time.perf_counter()
            out = code.greedy_decode(
                model, enc["input_ids"], enc["attention_mask"], n, pad_token_id=tok.pad_token_id
            )
            return time.perf_counter() - started, out

    def step_ms(code, model) -> float:
        return (decode(code, model, N)[0] - decode(code, model, 1)[0]) / (N - 1) * 1000

    for name, model in models.items():  # warm-up, and the same tokens from both
        a, b = (decode(code, model, N)[1] for code in codes.values())
        if not torch.equal(a, b):
            sys.exit(f"{name}: the two decoders' greedy tokens differ")
    ms = {(c, m): [] for c in codes for m in models}
    order = list(codes.items())
    for round_ in range(args.rounds):
        for c, code in order if round_ % 2 == 0 else order[::-1]:
            for m, model in models.items():
                ms[c, m].append(step_ms(code, model))
    for (c, m), v in ms.items():
        print(
            f"{args.dtype} {c} {m}: {statistics.median(v):.2f} ms/step [{min(v):.2f}-{max(v):.2f}]"
        )
    for c in codes:
        r = sorted(d / p for d, p in zip(ms[c, "dense"], ms[c, "50%"], strict=True))
        med = statistics.median(r)
        print(
            f"{args.dtype} {c}: 50% speed-up {med:.2f}x [{r[0]:.2f}-{r[-1]:.2f}], "
            f"{med / CEILING:.2f} of the {CEILING}x ceiling"
        )
    old, new = codes
    for m in models:
        r = sorted(a / b for a, b in zip(ms[old, m], ms[new, m], strict=True))
        print(
            f"{args.dtype} {m}: {old} / working tree per step "
            f"{statistics.median(r):.3f}x [{r[0]:.3f}-{r[-1]:.3f}]"
        )


if __name__ == "__main__":
    main()
