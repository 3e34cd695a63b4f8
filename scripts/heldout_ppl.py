"""Reference perplexity of several models on the first N GSM8K test problems (chat, 0-shot).

The teacher-forced half of ``bonsai-prune evaluate`` (same prompt, same definition: exp of the
mean per-problem NLL of the reference solution), without generating: seconds per model.

    python scripts/heldout_ppl.py default runs/a runs/b --limit 200 --out ppl.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.eval.gsm8k import reference_nll
from bonsai_prune.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="'default', model folders or run directories")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    problems = load_gsm8k("test")[: args.limit]
    figures = {}
    for spec in args.models:
        model, tokenizer = load_model(spec, dtype=args.dtype)
        nll, _ = reference_nll(
            model, tokenizer, problems, prompt="chat", shots=0, batch_size=8, progress=False
        )
        finite = nll[torch.isfinite(nll)]
        figures[spec] = {
            "reference_perplexity": math.exp(float(finite.mean())),
            "n": int(finite.numel()),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        print(
            f"{spec}: reference perplexity {figures[spec]['reference_perplexity']:.3f} "
            f"on {figures[spec]['n']} problems",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"limit": args.limit, "models": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
