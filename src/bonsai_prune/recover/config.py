"""RecoverConfig: how a pruned model is distilled from its dense parent (frozen, validated)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import PROMPT_STYLES, _check_choice, _JsonConfig
from ..errors import ConfigError

DATA_SOURCES = ("gold", "self", "both")
TRAINABLE = ("full", "lora")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value, *, low: float, high: float = math.inf, open_low=True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class RecoverConfig(_JsonConfig):
    """One recovery run: distillation from the dense parent on GSM8K train (never test).

    Budgets are tokens, not epochs: an epoch of GSM8K train (about 1.5M tokens) takes hours
    on 2 CPU cores (DESIGN.md section 8).
    """

    max_tokens: int = 200_000  # training tokens (prompt + solution, no padding) consumed
    batch_size: int = 8  # sequences per optimizer step
    max_length: int = 384  # prompt + solution tokens kept per sequence (GSM8K fits in ~300)
    data: str = "gold"  # gold train solutions, "self" (the parent's greedy ones), or "both"
    self_max_new_tokens: int = 256  # cap on the parent's self-data solutions
    prompt: str = "chat"
    train: str = "full"  # every remaining weight (AdamW) or "lora" (peft, merged at the end)
    train_embeddings: bool = False  # the tied embedding was not pruned: leave it as the parent's
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lr: float = 5e-5
    weight_decay: float = 0.0  # a short recovery should move weights little, not shrink them
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # optional cross-entropy on the gold (or self) tokens
    eval_every: int = 25  # steps between held-out KL measurements (0: only at the end)
    n_eval: int = 32  # GSM8K train problems kept out of training for the held-out KL
    checkpoint_every: int = 25  # steps between resumable checkpoints
    dtype: str = "auto"  # compute dtype of the forwards; the trained weights stay fp32
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("max_length", self.max_length, 16)
        _check_int("self_max_new_tokens", self.self_max_new_tokens, 1)
        _check_int("lora_rank", self.lora_rank, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("eval_every", self.eval_every, 0)
        _check_int("n_eval", self.n_eval, 1)
        _check_int("checkpoint_every", self.checkpoint_every, 1)
        _check_int("seed", self.seed, 0)
        _check_choice("recovery data", self.data, DATA_SOURCES)
        _check_choice("prompt style", self.prompt, PROMPT_STYLES)
        _check_choice("trainable set", self.train, TRAINABLE)
        _check_choice("dtype", self.dtype, ("auto", "fp32", "bf16"))
        _check_float("lr", self.lr, low=0.0, high=1.0)
        _check_float("lora_alpha", self.lora_alpha, low=0.0)
        _check_float("weight_decay", self.weight_decay, low=0.0, open_low=False)
        _check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0, open_low=False)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("kl_weight", self.kl_weight, low=0.0, open_low=False)
        _check_float("ce_weight", self.ce_weight, low=0.0, open_low=False)
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ConfigError("kl_weight and ce_weight are both 0: nothing to train on")
