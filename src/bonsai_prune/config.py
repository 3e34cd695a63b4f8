"""Run configurations: frozen, typed, validated on construction, round-tripped through JSON.

The library never sees CLI objects: the CLI builds one of these and makes one call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

UNIT_CHOICES = ("both", "heads", "neurons")
PROMPT_STYLES = ("chat", "plain")
REGRESSIONS = ("ridge", "lasso")
ACCURACY_RULES = ("strict", "flexible", "contains")  # utility/metrics.py ACCURACY_RULES
REFERENCE_KINDS = ("self", "gold", "gold_prefix")  # utility/references.py
UTILITY_STOPS = ("answer", "none")  # utility/generation.py STOP_PATTERNS


def _check_fraction(name: str, value: Any, *, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}; {hint}")
    if not 0 < value < 1:
        raise ConfigError(f"{name} must be in (0, 1), got {value}; {hint}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


class _JsonConfig:
    """JSON round-trip that refuses unknown keys (a typo must not silently become a default)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        values = dict(data)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in values and isinstance(values[f.name], dict) and f.name == "utility":
                values[f.name] = UtilityConfig.from_dict(values[f.name])
        return cls(**values)


@dataclass(frozen=True)
class UtilityConfig(_JsonConfig):
    """How a sub-model is scored on the calibration problems (higher is better)."""

    name: str = "perplexity"  # or "comprehensive" (U†), or any registered utility
    # chosen by round-1 validity on the packaged model (results/validity/round1_16x4.json): the
    # unmasked model beats 100% of its sub-models, rank correlation of damage with score -0.51
    weights: dict[str, float] = field(
        default_factory=lambda: {"prob": 40.0, "lex": 30.0, "sem": 30.0}
    )
    accuracy: str = "strict"
    lexical: str = "rouge_numbers"
    # a cap: each row stops after its answer line (stop="answer") or at end of sequence; 96 is
    # the setting measured (20, the original's, cut the default model's solutions mid-preamble)
    gen_tokens: int = 96
    prompt: str = "chat"
    shots: int = 0
    max_length: int = 768  # tokens of prompt + solution kept for teacher forcing
    reference: str = "self"  # what lex/sem compare with: self | gold | gold_prefix (references.py)
    stop: str = "answer"  # "answer": a row ends after its answer line; "none": at EOS only

    def __post_init__(self) -> None:
        from .utility.weights import validate_weights

        object.__setattr__(self, "weights", validate_weights(dict(self.weights)))
        _check_choice("prompt style", self.prompt, PROMPT_STYLES)
        _check_choice("accuracy rule", self.accuracy, ACCURACY_RULES)
        _check_choice("reference", self.reference, REFERENCE_KINDS)
        _check_choice("stop rule", self.stop, UTILITY_STOPS)
        if self.reference == "gold" and self.shots < 1:
            raise ConfigError(
                "reference 'gold' needs worked exemplars in the prompt (shots >= 1), got shots=0; "
                "e.g. --shots 2, or use reference 'self'"
            )
        if self.lexical not in ("rouge_numbers", "token_f1"):
            raise ConfigError(
                f"unknown lexical metric {self.lexical!r}; choose rouge_numbers or token_f1"
            )
        if not isinstance(self.gen_tokens, int) or self.gen_tokens < 1:
            raise ConfigError(f"gen_tokens must be a positive integer, got {self.gen_tokens!r}")
        if not isinstance(self.shots, int) or not 0 <= self.shots <= 8:
            raise ConfigError(f"shots must be an integer in [0, 8], got {self.shots!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"max_length must be an integer >= 2, got {self.max_length!r}")


@dataclass(frozen=True)
class PruneConfig(_JsonConfig):
    """One Bonsai pruning run (DESIGN.md section 2)."""

    model: str = "default"
    dtype: str = "auto"  # bf16 where the hardware has it natively, else fp32 (see fast_dtype)
    device: str = "cpu"
    method: str = (
        "bonsai"  # or a baseline registered in methods/ (random, magnitude, wanda, finercut)
    )
    sparsity: float = 0.3  # target fraction of non-embedding parameters removed
    prune_frac: float = 0.1  # fraction of the original parameters removed per round
    masks_per_round: int = 32
    masks_per_forward: int = 8  # sub-models batched into one generation (utilities that can)
    calib_samples: int = 8
    seed: int = 0
    prior: str = "wanda"
    units: str = "both"
    regression: str = "ridge"
    # units a sampled mask removes per module: "varied" (0..all candidates, so modules can be
    # compared) or "fixed" (Bonsai's round(f * n)); see sampling.py
    removal_counts: str = "varied"
    allow_empty_modules: bool = False  # an MLP may lose all its neurons only if True
    tolerance: float = 0.005  # stop when sparsity is within this of the target
    data: str | None = None  # JSONL of question/answer lines; None = packaged GSM8K train
    utility: UtilityConfig = field(default_factory=UtilityConfig)

    def __post_init__(self) -> None:
        _check_fraction("sparsity", self.sparsity, hint="e.g. --sparsity 0.5")
        _check_fraction("prune fraction", self.prune_frac, hint="e.g. --prune-frac 0.1")
        for name in ("masks_per_round", "masks_per_forward", "calib_samples", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.masks_per_round < 2 or self.masks_per_round % 2:
            raise ConfigError(
                f"masks per round must be an even number >= 2 (antithetic pairs), got {self.masks_per_round}"
            )
        if self.masks_per_forward < 1:
            raise ConfigError(f"masks per forward must be at least 1, got {self.masks_per_forward}")
        if self.calib_samples < 1:
            raise ConfigError(f"calibration samples must be at least 1, got {self.calib_samples}")
        _check_choice("unit kind", self.units, UNIT_CHOICES)
        from .methods import METHODS  # here, not at the top: methods import this module

        _check_choice("method", self.method, ("bonsai", *METHODS.names()))
        _check_choice("regression", self.regression, REGRESSIONS)
        from .sampling import REMOVAL_COUNTS

        _check_choice("removal counts", self.removal_counts, REMOVAL_COUNTS)
        if not 0 < self.tolerance < self.sparsity:
            raise ConfigError(f"tolerance must be in (0, sparsity), got {self.tolerance}")
        if isinstance(self.utility, dict):
            object.__setattr__(self, "utility", UtilityConfig.from_dict(self.utility))
