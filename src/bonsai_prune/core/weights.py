"""The U† weights: how many of the 100 points go to each metric of U†.

``acc`` (a 0/1 final-answer rule), ``lex`` and ``sem`` (similarity to a reference text) are the
original study's three; ``prob`` is the continuous accuracy term (the geometric-mean probability
of the gold final answer's tokens after the question and the gold reasoning), which a damaged
model loses gradually where the 0/1 rule is all zeros at this scale.

Weights are user-set (``--weights acc=50,lex=25,sem=25``) and must sum to 100, so that U† lies
in [0, 100]; a wrong mix stops the run before any model is loaded (DESIGN.md §3).
"""

from __future__ import annotations

import math

from bonsai_prune.errors import ConfigError

NAMES = ("acc", "lex", "sem", "prob")
ALIASES = {
    "accuracy": "acc",
    "lexical": "lex",
    "semantic": "sem",
    "probability": "prob",
}
DEFAULT_WEIGHTS: dict[str, float] = {"acc": 50.0, "lex": 25.0, "sem": 25.0, "prob": 0.0}
# the pruning utility's default mix, chosen by round-1 validity (README, results/validity/)
PRUNING_WEIGHTS: dict[str, float] = {"acc": 0.0, "lex": 30.0, "sem": 30.0, "prob": 40.0}
TOTAL = 100.0
_TOLERANCE = 1e-6
_EXAMPLE = "e.g. --weights acc=50,lex=25,sem=25"


def format_weights(weights: dict[str, float]) -> str:
    """Weights in the ``--weights`` syntax, e.g. "acc=50,lex=25,sem=25" (parse_weights reads it).

    Zero weights are left out (a name left out weighs 0), so the original three-metric mixes
    print as they always did.
    """
    return ",".join(f"{name}={_number(value)}" for name, value in weights.items() if value)


def parse_weights(spec: str) -> dict[str, float]:
    """Parse "acc=50,lex=25,sem=25" (long names accuracy/lexical/semantic too) and validate it.

    Returns every short name in the order of NAMES; a name left out weighs 0.
    """
    weights: dict[str, float] = {}
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name or not value:
            raise ConfigError(f"U† weight entry {entry!r} is not name=value; {_EXAMPLE}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"U† weight {name}={value!r} is not a number; {_EXAMPLE}") from None
        if name in weights:
            raise ConfigError(f"U† weight {name!r} is given twice in {spec!r}; {_EXAMPLE}")
        weights[name] = number
    if not weights:
        raise ConfigError(f"no U† weights given in {spec!r}; {_EXAMPLE}")
    return validate_weights(weights)


def validate_weights(weights: dict[str, float]) -> dict[str, float]:
    """Check a weight mix and return it complete: every name of NAMES -> float, summing to 100.

    Long names are mapped to short ones; missing names weigh 0. Raises ConfigError for an
    unknown or repeated name, a negative or non-finite weight, or a sum other than 100.
    """
    complete = dict.fromkeys(NAMES, 0.0)
    seen: set[str] = set()
    for given_name, value in weights.items():
        name = ALIASES.get(given_name, given_name)
        if name not in complete:
            known = ", ".join(NAMES + tuple(ALIASES))
            raise ConfigError(f"unknown U† weight {given_name!r}; use {known} ({_EXAMPLE})")
        if name in seen:
            raise ConfigError(f"U† weight {name!r} is given twice (as {given_name!r} too)")
        seen.add(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"U† weight {given_name}={value!r} is not a number; {_EXAMPLE}")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"U† weight {given_name}={value} must be a finite number >= 0")
        complete[name] = float(value)
    total = sum(complete.values())
    if abs(total - TOTAL) > _TOLERANCE:
        given = ", ".join(f"{name}={_number(value)}" for name, value in weights.items())
        raise ConfigError(f"U† weights must sum to 100, got {given} ({_number(total)}); {_EXAMPLE}")
    return complete


def _number(value: float) -> str:
    """50.0 -> "50", 33.5 -> "33.5": weights print as people type them."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
