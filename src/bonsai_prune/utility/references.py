"""What lexical and semantic similarity compare a sub-model's solution with (DESIGN.md §3).

- ``self`` (default for pruning): the dense parent's own greedy solution to the problem, with
  the same prompt and token cap. The parent matches it by construction, so every deviation a
  sub-model shows is damage; the chat model's preamble ("To solve this problem, ...") is in the
  reference too and no longer rewards sub-models that skip it. This is the self-generated
  calibration of 2025-26 reasoning-aware pruning (RESP, SSGR, RAC). The references are
  generated once, when the run starts, stored in the run directory and reused on resume.
- ``gold``: the GSM8K worked solution, with worked exemplars in the prompt so the model writes
  in the reference's style. A solution that ended by itself is compared with the whole
  reference; one cut at the cap with the reference's prefix of the same number of tokens
  (with the exemplars, generation and reference start alike, so the prefix is a fair match).
- ``gold_prefix``: the original U† study's setting: the reference's first ``gen_tokens`` tokens,
  whatever the model wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from bonsai_prune.config import REFERENCE_KINDS  # noqa: F401  (the one list of reference kinds)
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import Problem
from bonsai_prune.data.prompts import worked_solution
from bonsai_prune.errors import PruningError, RunDirectoryError
from bonsai_prune.rundir.files import atomic_write_json, read_json
from bonsai_prune.utility.generation import generate_greedy

SELF_REFERENCES_FILE = "self_references.json"


def problem_key(problem: Problem) -> str:
    """A stable key of one problem (its question and answer), for the reference cache."""
    text = f"{problem.question}\n{problem.answer}".encode()
    return hashlib.sha256(text).hexdigest()[:20]


def generation_settings(config) -> dict:
    """The UtilityConfig fields a self reference depends on; a stored file must match them."""
    return {
        "prompt": config.prompt,
        "shots": config.shots,
        "gen_tokens": config.gen_tokens,
        "stop": config.stop,
    }


def generate_self_references(
    model, tokenizer, problems: Sequence[Problem], config, batch_size: int = 8
) -> dict[str, str]:
    """The dense model's greedy solution of each problem: {problem_key: text}.

    Same prompt, cap and stop rule as the sub-models will get (``config`` is the UtilityConfig).
    """
    unique = list({problem_key(p): p for p in problems}.items())
    device = next(model.parameters()).device
    references: dict[str, str] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        batch = build_batch(
            tokenizer,
            [p for _, p in chunk],
            prompt=config.prompt,
            shots=config.shots,
            max_length=config.max_length,
            device=device,
        )
        generated = generate_greedy(
            model,
            tokenizer,
            batch.prompt_ids,
            batch.prompt_attention_mask,
            config.gen_tokens,
            config.stop,
        )
        references.update(
            (key, text) for (key, _), text in zip(chunk, generated.texts, strict=True)
        )
    return references


def prepare_self_references(
    utility,
    model,
    tokenizer,
    problems: Sequence[Problem],
    run_dir: str | Path | None = None,
    batch_size: int = 8,
) -> dict[str, str] | None:
    """Hook for ``api.prune``: give a ``self``-reference utility its references; else a no-op.

    Call it right after loading the dense model, before any round runs or is replayed, with
    every calibration problem the run may use. With ``run_dir`` the references are read from
    and written to ``run_dir/self_references.json`` (keyed by problem), so a resumed run reuses
    them and only problems not stored yet are generated. Returns the references it installed.
    """
    config = getattr(utility, "config", None)
    if getattr(config, "reference", None) != "self" or not hasattr(utility, "use_self_references"):
        return None
    settings = generation_settings(config)
    path = Path(run_dir) / SELF_REFERENCES_FILE if run_dir is not None else None
    stored: dict[str, str] = {}
    if path is not None and path.is_file():
        saved = read_json(path)
        if saved.get("settings") != settings:
            raise RunDirectoryError(
                f"{path} was generated with {saved.get('settings')}, not {settings}; "
                "use a new --out"
            )
        stored = dict(saved["references"])
    missing = [p for p in problems if problem_key(p) not in stored]
    if missing:
        stored.update(generate_self_references(model, tokenizer, missing, config, batch_size))
        if path is not None:
            atomic_write_json(path, {"settings": settings, "references": stored})
    utility.use_self_references(stored)
    return stored


def self_reference_texts(references: dict[str, str], problems: Sequence[Problem]) -> list[str]:
    """The stored self reference of each problem; a missing one is an error, never a guess."""
    texts = []
    for problem in problems:
        key = problem_key(problem)
        if key not in references:
            raise PruningError(
                f"no self reference for calibration problem {key} ({problem.question[:40]!r}...); "
                "call utility.references.prepare_self_references with the dense model first"
            )
        texts.append(references[key])
    return texts


def gold_texts(
    tokenizer, problems: Sequence[Problem], n_tokens: Sequence[int], finished: Sequence[bool]
) -> list[str]:
    """``gold``: the whole worked solution after a finished generation, else its same-length prefix."""
    texts = []
    for problem, n, done in zip(problems, n_tokens, finished, strict=True):
        solution = worked_solution(problem)
        texts.append(solution if done else prefix_text(tokenizer, solution, n))
    return texts


def prefix_text(tokenizer, text: str, n_tokens: int) -> str:
    """The first ``n_tokens`` tokens of ``text``, as text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)
