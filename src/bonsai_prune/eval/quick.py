"""What a user got, measured at the end of ``prune``: dense against pruned, in a minute.

Reference perplexity on held-out problems (the first ``n`` of GSM8K test, never used for
calibration, which draws from train) and greedy decode speed at batch 1, each model timed in
alternation so a busy machine slows both alike. This is a sanity check, not the study:
``bonsai-prune evaluate`` gives the full figures with confidence intervals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import median

import torch

from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.data.prompts import format_prompt
from bonsai_prune.eval.gsm8k import reference_nll
from bonsai_prune.utility.generation import greedy_sequences


@dataclass(frozen=True)
class QuickCheck:
    """Dense and pruned figures of one check (perplexity: exp of mean per-token NLL)."""

    n_problems: int
    perplexity: dict[str, float]  # "dense" / "pruned"
    decode_tokens_per_s: dict[str, float]  # batch 1, greedy, median of the repeats
    speedup: float  # median over repeats of pruned / dense, each pair timed back to back


@torch.no_grad()
def decode_tokens_per_s(model, tokenizer, prompt: str, n_tokens: int) -> float:
    """Greedy tokens per second after the prompt, batch 1 (the first token's prefill included)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    began = time.perf_counter()
    out = greedy_sequences(
        model,
        ids["input_ids"],
        ids["attention_mask"],
        n_tokens,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (out.shape[1] - ids["input_ids"].shape[1]) / (time.perf_counter() - began)


def quick_check(
    models: dict[str, tuple], *, n_problems: int = 8, decode_tokens: int = 32, repeats: int = 5
) -> QuickCheck:
    """Measure ``{"dense": (model, tokenizer), "pruned": (model, tokenizer)}``.

    The speed-up is the median of the per-repeat ratios, not the ratio of the medians: a
    repeat times both models back to back, so a load that comes and goes slows both alike
    (two repeats of 24 tokens read a 30% model at 1.00x here once, where it is 1.1x)."""
    problems = load_gsm8k("test")[:n_problems]
    perplexity = {}
    for name, (model, tokenizer) in models.items():
        nll, _ = reference_nll(
            model, tokenizer, problems, prompt="chat", shots=0, batch_size=8, progress=False
        )
        finite = nll[torch.isfinite(nll)]
        perplexity[name] = math.exp(float(finite.mean())) if finite.numel() else math.nan
    _, tokenizer = models["dense"]
    prompt = format_prompt(tokenizer, problems[0].question, "chat")
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for model, tok in models.values():  # warm-up
        decode_tokens_per_s(model, tok, prompt, 4)
    for _ in range(repeats):
        for name, (model, tok) in models.items():
            speeds[name].append(decode_tokens_per_s(model, tok, prompt, decode_tokens))
    ratios = [p / d for d, p in zip(speeds["dense"], speeds["pruned"], strict=True)]
    return QuickCheck(
        n_problems, perplexity, {k: median(v) for k, v in speeds.items()}, median(ratios)
    )


def format_check(check: QuickCheck, out: str | None, parent: str = "default") -> str:
    """The table and the next commands, as ``prune`` prints them."""
    ppl, tps = check.perplexity, check.decode_tokens_per_s
    lines = [
        f"held-out check (first {check.n_problems} GSM8K test problems, batch-1 greedy decode):",
        f"  reference perplexity: dense {ppl['dense']:.2f} -> pruned {ppl['pruned']:.2f}"
        f" ({ppl['pruned'] / ppl['dense']:.2f}x)",
        f"  decode: dense {tps['dense']:.1f} -> pruned {tps['pruned']:.1f} tokens/s"
        f" ({check.speedup:.2f}x; a shared machine makes this noisy)",
    ]
    if out:
        lines += [
            "next:",
            f"  bonsai-prune evaluate --model {out} --limit 300 --out {out}/eval",
            f"  bonsai-prune evaluate --model {parent} --limit 300 --out {out}/eval-dense",
            f"  bonsai-prune compare {out}/eval --baseline {out}/eval-dense",
            f"  python -c \"import bonsai_prune as bp; m, t = bp.load_pruned('{out}')\"",
        ]
    return "\n".join(lines)
