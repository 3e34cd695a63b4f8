"""Run configurations: frozen, typed, validated on construction, round-tripped through JSON.

Each field is declared once, here, with its default, its help text and where its choices come
from (``metadata``): the CLI builds its options from these declarations (``cli_options.py``),
so a new field or a newly registered name appears in ``--help`` and in validation without
touching the CLI. Names that live in a registry (method, prior, utility) are checked against it
at the boundary (``api.check_registered``), since registries fill as extension modules import.
The library never sees CLI objects: the CLI builds one of these and makes one call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bonsai_prune.core.metrics import ACCURACY_RULES, LEXICAL_METRICS, UTILITY_STOPS
from bonsai_prune.core.regression import BETA_PRIORS, REGRESSIONS
from bonsai_prune.core.sampling import REMOVAL_COUNTS
from bonsai_prune.core.weights import DEFAULT_WEIGHTS, PRUNING_WEIGHTS, validate_weights
from bonsai_prune.data.problems import SPLITS
from bonsai_prune.data.prompts import PROMPT_STYLES
from bonsai_prune.errors import ConfigError
from bonsai_prune.models.adapter import UNIT_KINDS
from bonsai_prune.models.loading import DEFAULT_MODEL, DEVICES, DTYPES


def option(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field carrying its CLI help and, optionally, ``choices`` (a tuple),
    ``registry`` (a registry's name), ``flag`` (the option name if not --field-name) and
    ``aliases`` (older option names that still work)."""
    meta["help"] = help
    if callable(default) and not isinstance(default, (str, int, float, bool)):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


REFERENCE_KINDS = ("self", "gold", "gold_prefix")  # what U†'s lex/sem compare with (references.py)


def _check_fraction(name: str, value: Any, *, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}; {hint}")
    if not 0 < value < 1:
        raise ConfigError(f"{name} must be in (0, 1), got {value}; {hint}")


def _check_int(
    name: str, value: Any, *, minimum: int, maximum: int | None = None, hint: str = ""
) -> None:
    accepted = (
        f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    )
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise ConfigError(f"{name} must be {accepted}{' ' + hint if hint else ''}, got {value!r}")


MAX_SEED = 2**32 - 1  # what every seeded library here (torch, numpy, random) accepts


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _check_text(name: str, value: Any, *, optional: bool = False, hint: str = "") -> None:
    """A non-empty string (an empty one would silently mean the default)."""
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{name} must be a non-empty string, got {value!r}{'; ' + hint if hint else ''}"
        )


def _check_choices(config: Any) -> None:
    """Every field declared with ``choices`` holds one of them."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            label = f.metadata.get("label", f.name.replace("_", " "))
            raise ConfigError(f"unknown {label} {value!r}; choose one of: {', '.join(choices)}")


class _JsonConfig:
    """JSON round-trip that refuses unknown keys (a typo must not silently become a default).

    ``SAVED_BEFORE`` maps a field added after runs were saved to the value those runs used, so
    ``from_saved`` reads an old run's config as what it ran, not as today's default (and
    ``--resume`` of it keeps its design); ``from_dict`` (a new spec, e.g. a grid) takes defaults.
    """

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def identity(self) -> dict[str, Any]:
        """``to_dict`` without the fields left at the value runs saved before them had: what
        a cache key hashes, so adding a field keeps every cached result that did not use it."""
        return {
            name: value
            for name, value in self.to_dict().items()
            if name not in self.SAVED_BEFORE or value != self.SAVED_BEFORE[name]
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("utility"), dict):
            values["utility"] = UtilityConfig.from_dict(values["utility"])
        return cls(**values)

    @classmethod
    def from_saved(cls, data: dict[str, Any]):
        """A config a run saved: fields it predates take the value it ran with."""
        return cls.from_dict({**cls.SAVED_BEFORE, **data})


def _weights_option(default: dict[str, float] = DEFAULT_WEIGHTS) -> Any:
    return option(
        lambda: dict(default),
        "U† weights summing to 100 over acc, lex, sem and prob (the gold answer's probability, "
        "which needs a model), e.g. acc=38,lex=38,sem=24",
        parse="weights",
    )


PROMPT_HELP = "the model's chat template, or plain 'Question: ... Answer:' text"


# Options UtilityConfig and EvalConfig share (how a solution is posed and scored): one each.
def _accuracy_option() -> Any:
    return option(
        "strict",
        "accuracy rule of U†: strict (an answer after a marker or at the end of a finished "
        "solution), flexible (the last number), contains (the original study's rule)",
        choices=tuple(ACCURACY_RULES),
        label="accuracy rule",
    )


def _lexical_option() -> Any:
    return option(
        "rouge_numbers",
        "lexical metric of U†",
        choices=tuple(LEXICAL_METRICS),
        label="lexical metric",
    )


def _prompt_option() -> Any:
    return option("chat", PROMPT_HELP, choices=PROMPT_STYLES, label="prompt style")


SHOTS_HELP = "k worked GSM8K train exemplars in the prompt"


@dataclass(frozen=True)
class UtilityConfig(_JsonConfig):
    """How a sub-model is scored on the calibration problems (higher is better)."""

    name: str = option(
        "perplexity",
        "what scores a sub-model: perplexity, comprehensive (U†), ...",
        registry="utility",
        flag="utility",
    )
    # chosen by round-1 validity on the packaged model (results/validity/): the unmasked model
    # beats every one of its sub-models and damage correlates with the score (see README)
    weights: dict[str, float] = _weights_option(PRUNING_WEIGHTS)
    accuracy: str = _accuracy_option()
    lexical: str = _lexical_option()
    # a cap: each row stops after its answer line (stop="answer") or at end of sequence; 96 is
    # the setting measured (20, the original's, cut the default model's solutions mid-preamble)
    gen_tokens: int = option(96, "cap on the tokens each sub-model generates for U†")
    prompt: str = _prompt_option()
    shots: int = option(0, SHOTS_HELP)
    max_length: int = option(768, "tokens of prompt + solution kept for teacher forcing")
    reference: str = option(
        "self",
        "what U†'s lexical and semantic terms compare with: self (the dense parent's own "
        "solution), gold (GSM8K's, needs --shots), gold_prefix (the original study's)",
        choices=REFERENCE_KINDS,
    )
    stop: str = option(
        "answer",
        "answer: a row ends after its answer line; none: at end of sequence only",
        choices=UTILITY_STOPS,
        label="stop rule",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", validate_weights(dict(self.weights)))
        _check_choices(self)
        _check_int("gen_tokens", self.gen_tokens, minimum=1)
        _check_int("shots", self.shots, minimum=0, maximum=8)
        _check_int("max_length", self.max_length, minimum=2)
        if self.reference == "gold" and self.shots < 1:
            raise ConfigError(
                "reference 'gold' needs worked exemplars in the prompt (shots >= 1), got shots=0; "
                "e.g. --shots 2, or use reference 'self'"
            )


@dataclass(frozen=True)
class PruneConfig(_JsonConfig):
    """One pruning run (DESIGN.md section 2)."""

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {
        "beta_prior": "uniform",
        "compensate": False,
        "compensate_samples": 16,
        "mlp_multiple": 1,
    }

    model: str = option(
        DEFAULT_MODEL,
        "'default' (packaged SmolLM2-135M-Instruct), a local folder, a run directory or a hub id",
    )
    dtype: str = option(
        "auto",
        "auto: bf16 on CUDA or CPUs with native bf16, else fp32",
        choices=("auto", *DTYPES),
    )
    device: str = option("cpu", "where the model runs", choices=DEVICES)
    method: str = option(
        "bonsai",
        "bonsai, or a one-shot baseline (they ignore the round options)",
        registry="method",
    )
    sparsity: float = option(0.3, "target fraction of non-embedding parameters removed")
    prune_fraction: float = option(
        0.1, "fraction of the original parameters removed per round", aliases=("--prune-frac",)
    )
    masks_per_round: int = option(32, "sub-models sampled per round (antithetic pairs)")
    stop_agreement: float = option(
        0.0,
        "end a round's sampling once two successive checks would remove units that agree this "
        "much (Jaccard, e.g. 0.9): --masks-per-round becomes a maximum; 0: score them all",
    )
    masks_per_check: int = option(8, "sub-models scored between two stability checks (even)")
    masks_per_forward: int = option(8, "sub-models batched into one forward or generation")
    calib_samples: int = option(8, "calibration problems each sub-model is scored on")
    seed: int = option(0, "seed of every random choice of the run")
    prior: str = option("wanda", "per-unit prior that fixes and weights units", registry="prior")
    unit_kinds: str = option(
        "both",
        "kinds of unit to prune",
        choices=tuple(UNIT_KINDS),
        label="unit kind",
        aliases=("--units",),
    )
    regression: str = option(
        "ridge",
        "regression of utility on masks: ridge or lasso over the units, or modules (ridge over "
        "each module's share kept, spread over its units by the prior; measured worse at 20%)",
        choices=REGRESSIONS,
    )
    beta_prior: str = option(
        "cost",
        "prior scale of each unit's importance in the ridge/lasso fit: cost (sqrt of its "
        "parameters: a head may carry a larger effect than a neuron) or uniform (one penalty "
        "for all, as Bonsai); measured better at 10%: held-out ppl 4.28 vs 4.76",
        choices=BETA_PRIORS,
        label="beta prior",
    )
    removal_counts: str = option(
        "graded",
        "units a sampled sub-model removes per module: graded (half an intensity shared by the "
        "sub-model's modules, half each module's own draw: totals and modules both vary), "
        "varied (0 to all candidates, independently per module) or fixed (Bonsai's round(f*n))",
        choices=REMOVAL_COUNTS,
        label="removal counts",
    )
    allow_empty_modules: bool = option(False, "a module may lose all its units")
    tolerance: float = option(0.005, "stop when sparsity is within this of the target")
    mlp_multiple: int = option(
        1,
        "keep every MLP's width a multiple of N, its least important neurons going N at a time "
        "(GPU tiles: 8-64; llama.cpp Q8_0: 32, k-quants: 256); 1: any width",
    )
    compensate: bool = option(
        True,
        "before each slice, refit the output projections of thinned modules by least squares "
        "on calibration activations, so kept units also write what removed ones wrote",
    )
    compensate_samples: int = option(
        16, "problems (the data pool's last) whose activations the refit uses"
    )
    data: str | None = option(
        None, "JSONL of question/answer lines (default: packaged GSM8K train)"
    )
    utility: UtilityConfig = option(UtilityConfig, "how sub-models are scored")

    def __post_init__(self) -> None:
        if isinstance(self.utility, dict):
            object.__setattr__(self, "utility", UtilityConfig.from_dict(self.utility))
        _check_fraction("sparsity", self.sparsity, hint="e.g. --sparsity 0.5")
        _check_fraction("prune fraction", self.prune_fraction, hint="e.g. --prune-fraction 0.1")
        for name in (
            "masks_per_round",
            "masks_per_forward",
            "calib_samples",
            "seed",
            "masks_per_check",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.masks_per_round < 2 or self.masks_per_round % 2:
            raise ConfigError(
                "masks per round must be an even number >= 2 (antithetic pairs), "
                f"got {self.masks_per_round}"
            )
        if self.masks_per_check < 2 or self.masks_per_check % 2:
            raise ConfigError(
                f"masks per check must be an even number >= 2, got {self.masks_per_check}"
            )
        _check_float("stop_agreement", self.stop_agreement, low=0.0, high=1.0, open_low=False)
        if self.masks_per_forward < 1:
            raise ConfigError(f"masks per forward must be at least 1, got {self.masks_per_forward}")
        if self.calib_samples < 1:
            raise ConfigError(f"calibration samples must be at least 1, got {self.calib_samples}")
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_choices(self)
        _check_text("model", self.model, hint="give 'default', a model folder or a hub id")
        _check_text("data", self.data, optional=True, hint="omit --data for packaged GSM8K")
        _check_bool("allow_empty_modules", self.allow_empty_modules)
        _check_bool("compensate", self.compensate)
        _check_int("compensate_samples", self.compensate_samples, minimum=1, hint="(problems)")
        _check_int("mlp_multiple", self.mlp_multiple, minimum=1, hint="(1: any width)")
        if (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, (int, float))
            or not 0 < self.tolerance < self.sparsity
        ):
            raise ConfigError(
                f"tolerance must be a number in (0, sparsity={self.sparsity}), got {self.tolerance!r}"
            )


@dataclass(frozen=True)
class EvalConfig(_JsonConfig):
    """One evaluation of one model on GSM8K (JSON round-trip via to_dict / from_dict)."""

    model: str = option(DEFAULT_MODEL, "'default', a local folder, a run directory or a hub id")
    dtype: str = option(
        "auto",
        "auto: bf16 on CUDA or CPUs with native bf16, else fp32",
        choices=("auto", *DTYPES),
    )
    device: str = option("cpu", "where the model runs", choices=DEVICES)
    split: str = option("test", "GSM8K split", choices=SPLITS)
    limit: int | None = option(None, "first N problems of the split (default: all)")
    max_new_tokens: int = option(  # enough for a full solution to reach its final answer
        256, "generation cap per problem"
    )
    batch_size: int = option(16, "problems generated together")
    prompt: str = _prompt_option()
    shots: int = option(0, SHOTS_HELP)
    weights: dict[str, float] = _weights_option()
    accuracy: str = _accuracy_option()
    lexical: str = _lexical_option()
    n_bootstrap: int = option(1000, "bootstrap resamples of the confidence intervals")
    seed: int = option(0, "seed of the bootstrap confidence intervals")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", validate_weights(dict(self.weights)))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a non-empty string, got {self.model!r}")
        _check_choices(self)
        if self.limit is not None:
            _check_int("limit", self.limit, minimum=1, hint="or None for the whole split")
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("n_bootstrap", self.n_bootstrap, minimum=1)
        _check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)
        _check_int("shots", self.shots, minimum=0, maximum=8)


DATA_SOURCES = ("gold", "self", "both")  # recovery data: GSM8K train solutions, the parent's, both
TRAINABLE = ("full", "lora")


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

    SAVED_BEFORE: ClassVar[dict[str, Any]] = {"micro_batch_size": 0}

    max_tokens: int = option(200_000, "training tokens (prompt + solution, no padding) consumed")
    batch_size: int = option(8, "sequences per optimizer step")
    micro_batch_size: int = option(
        0,
        "sequences per forward and backward, their gradients summed into the step's (0: the "
        "whole batch where the free memory holds it, else the most rows that fit): a lower "
        "value cuts the memory activations take, at some speed",
    )
    max_length: int = option(384, "prompt + solution tokens kept per sequence (GSM8K fits in ~300)")
    data: str = option(
        "self",
        "'self': the parent's greedy solutions (generated once per parent, then cached); "
        "'gold': GSM8K train solutions (measured: the student stops writing its end token); "
        "or 'both'",
        choices=DATA_SOURCES,
        label="recovery data",
    )
    self_max_new_tokens: int = option(256, "cap on the parent's self-data solutions")
    prompt: str = _prompt_option()
    train: str = option(
        "full",
        "every remaining weight (AdamW) or 'lora' (peft, merged at the end)",
        choices=TRAINABLE,
        label="trainable set",
    )
    train_embeddings: bool = option(  # the tied embedding was not pruned: leave it as the parent's
        False, "train the (tied) embedding too"
    )
    lora_rank: int = option(16, "rank of the LoRA adapters (train lora)")
    lora_alpha: float = option(32.0, "LoRA scaling alpha (train lora)")
    lr: float = option(5e-5, "peak learning rate (AdamW, warmup then cosine)")
    weight_decay: float = option(  # a short recovery should move weights little, not shrink them
        0.0, "AdamW weight decay"
    )
    warmup_steps: int = option(10, "steps of linear learning-rate warmup")
    min_lr_ratio: float = option(0.1, "the cosine ends at lr * this")
    temperature: float = option(1.0, "distillation temperature (the KL is scaled by T^2)")
    kl_weight: float = option(1.0, "weight of KL(parent || pruned) on solution tokens")
    ce_weight: float = option(0.0, "optional cross-entropy on the gold (or self) tokens")
    eval_every: int = option(25, "steps between held-out KL measurements (0: only at the end)")
    n_eval: int = option(32, "GSM8K train problems kept out of training for the held-out KL")
    checkpoint_every: int = option(25, "steps between resumable checkpoints")
    dtype: str = option(
        "auto",
        "compute dtype of the forwards; the trained weights stay fp32",
        choices=("auto", "fp32", "bf16"),
    )
    seed: int = option(0, "seed of the data order, held-out split and LoRA init")

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("micro_batch_size", self.micro_batch_size, minimum=0)
        _check_int("max_length", self.max_length, minimum=16)
        _check_int("self_max_new_tokens", self.self_max_new_tokens, minimum=1)
        _check_int("lora_rank", self.lora_rank, minimum=1)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("eval_every", self.eval_every, minimum=0)
        _check_int("n_eval", self.n_eval, minimum=1)
        _check_int("checkpoint_every", self.checkpoint_every, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_choices(self)
        _check_float("lr", self.lr, low=0.0, high=1.0)
        _check_float("lora_alpha", self.lora_alpha, low=0.0)
        _check_float("weight_decay", self.weight_decay, low=0.0, open_low=False)
        _check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0, open_low=False)
        _check_float("temperature", self.temperature, low=0.0, high=100.0)
        _check_float("kl_weight", self.kl_weight, low=0.0, open_low=False)
        _check_float("ce_weight", self.ce_weight, low=0.0, open_low=False)
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ConfigError("kl_weight and ce_weight are both 0: nothing to train on")


@dataclass(frozen=True)
class WorkersConfig(_JsonConfig):
    """Where sub-models are scored. It never changes a result, so it is kept apart from the
    PruneConfig: ``--resume`` may change it and the study cache does not key on it."""

    workers: int = option(
        0,
        "worker processes scoring sub-models, each holding a model replica (0: this process); "
        "with --ray, the number of Ray actors (default: one per GPU of the cluster)",
    )
    ray: str | None = option(
        None,
        "score on a Ray cluster: its address, 'auto' (the running one) or 'local' (start one); "
        "needs pip install 'bonsai-prune[ray]'",
    )

    def __post_init__(self) -> None:
        _check_int("workers", self.workers, minimum=0)
        if self.ray is not None:
            import importlib.util

            if importlib.util.find_spec("ray") is None:
                raise ConfigError(
                    "--ray needs Ray: pip install 'bonsai-prune[ray]' (or pip install ray)"
                )

    @property
    def enabled(self) -> bool:
        return self.workers > 0 or self.ray is not None
