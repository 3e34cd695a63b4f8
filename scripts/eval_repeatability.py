"""How much the evaluation alone moves a model's figures: the same problems, the same model,
generated in batches of two sizes (so each prompt has other companions and other padding),
in each dtype asked for.

Greedy decoding in bf16 rounds differently when a batch changes; a near-tie between two tokens
then gives another text from there on. The study measured this on its dense model (the first
300 problems, evaluated again inside the whole split: 90 of 300 same texts, strict 1.7% against
3.0%); this script measures it in a few minutes, per dtype, for any model:

    python scripts/eval_repeatability.py --model default --limit 64 --dtypes bf16 fp32 \
        --out results/repeatability.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bonsai_prune.config import EvalConfig
from bonsai_prune.eval.gsm8k import evaluate
from bonsai_prune.models import load_model
from bonsai_prune.study.figures import repeat_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="'default', a folder or a run")
    parser.add_argument("--limit", type=int, default=64, help="the first N test problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[16, 7])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype)
        runs, seconds = [], []
        for batch_size in args.batch_sizes:
            config = EvalConfig(
                model=args.model,
                dtype=dtype,
                limit=args.limit,
                max_new_tokens=args.max_new_tokens,
                batch_size=batch_size,
                weights={"acc": 50, "lex": 25, "sem": 25},
            )
            began = time.perf_counter()
            runs.append(evaluate(config, model=model, tokenizer=tokenizer).records)
            seconds.append(time.perf_counter() - began)
        r = repeat_figures(*runs)
        results[dtype] = {**r, "batch_sizes": args.batch_sizes, "seconds": seconds}
        strict = r["accuracy_strict"] or (0.0, 0.0)
        u = r["u_dagger"] or (0.0, 0.0)
        print(
            f"{dtype}: {r['same_prediction']} of {r['rows']} same texts"
            f"  strict {100 * strict[0]:.1f} / {100 * strict[1]:.1f} %"
            f"  U† {u[0]:.2f} / {u[1]:.2f}"
            f"  largest NLL gap {r['max_reference_nll_gap']:.2g}"
            f"  ({seconds[0]:.0f} s, {seconds[1]:.0f} s)",
            flush=True,
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "limit": args.limit, "max_new_tokens": args.max_new_tokens}
        args.out.write_text(json.dumps({**meta, "dtypes": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
