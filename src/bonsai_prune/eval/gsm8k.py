"""Evaluate a (pruned or dense) model on GSM8K: greedy solutions, U† metrics, perplexity, cost.

Every model is evaluated on the *first* ``limit`` problems of the split, in file order, so two
models evaluated with the same limit always see the same problems and their numbers compare
item by item. Each generation is scored against the full reference solution with
:func:`bonsai_prune.scoring.score_texts`, the combiner the pruning utility uses; every accuracy
rule is reported (strict: lm-evaluation-harness strict-match, an answer after a marker or at
the end of a finished solution; flexible: the last number; contains: the original study's),
with Wilson 95% intervals, and U† with a percentile-bootstrap one, because at this scale
accuracy is a few percent and its noise is as large as the effects being measured.

Plain k-shot prompts stop at a new "Question:" (as lm-evaluation-harness does) and the text is
cut there, so a made-up next question never decides the answer; chat prompts stop at the end
of sequence. ``max_new_tokens`` is a cap.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bonsai_prune.config import EvalConfig
from bonsai_prune.core.metrics import LM_EVAL_RULES
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import Problem, load_gsm8k
from bonsai_prune.data.prompts import exemplars, format_prompt
from bonsai_prune.errors import ConfigError, DataError, ModelLoadError, UnsupportedModelError
from bonsai_prune.eval.journal import JOURNAL, BatchJournal, text_digest, weights_digest
from bonsai_prune.eval.stats import CI_LEVEL, bootstrap_ci, wilson_interval
from bonsai_prune.memory import peak_resident_bytes, release_free_memory
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.models.loading import DEFAULT_MODEL, load_model, packaged_gguf
from bonsai_prune.models.pruned import MODEL_DIR, is_pruned_dir
from bonsai_prune.rundir.files import atomic_write_json, atomic_write_text
from bonsai_prune.utility.base import answer_probability, solution_nll
from bonsai_prune.utility.combine import score_texts
from bonsai_prune.utility.generation import generate_greedy

PROPORTIONS = (  # Wilson intervals; ours, then lm-evaluation-harness's rules (exactly)
    "accuracy_strict",
    "accuracy_flexible",
    "accuracy_contains",
    *(f"accuracy_{name}" for name in LM_EVAL_RULES),
)
CI_METRICS = (*PROPORTIONS, "answer_prob", "u_dagger")
MEAN_METRICS = (*PROPORTIONS, "lexical", "semantic", "answer_prob", "u_dagger")


@dataclass(frozen=True)
class EvalResult:
    """``summary``: the figures of the run (JSON-ready); ``records``: one dict per problem."""

    summary: dict
    records: list[dict]


@dataclass(frozen=True)
class Generations:
    """Greedy outputs in the order of the prompts given."""

    texts: list[str]
    n_new_tokens: list[int]  # up to and including the token that ended the row
    finished: list[bool]  # ended by itself (end of sequence, "Question:"), not by the cap
    seconds: float  # time spent inside model.generate


def first_problems(split: str, limit: int | None) -> list[Problem]:
    """The first ``limit`` problems of a GSM8K split in file order (all of them if None or more)."""
    problems = load_gsm8k(split)
    return problems if limit is None else problems[:limit]


@torch.no_grad()
def generate_solutions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: str = "none",
    progress: bool = True,
    journal: BatchJournal | None = None,
) -> Generations:
    """Greedy generation in batches of prompts sorted by length (less padding), order restored.

    stop: "none" (end of sequence) or "question" (also at a new "Question:", cut there).
    journal: batches already done are taken from it, new ones recorded in it (a killed
    evaluation resumes; ``eval.journal``).
    """
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: OOM shows early
    texts, counts = [""] * len(prompts), [0] * len(prompts)
    finished = [False] * len(prompts)
    tokenizer.padding_side = "left"
    seconds = 0.0
    with tqdm(total=len(prompts), desc="generating", unit="problem", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            if journal is not None and start in journal.done:
                done = journal.done[start]
                for i, row in enumerate(rows):
                    texts[row], counts[row] = done["texts"][i], done["counts"][i]
                    finished[row] = done["finished"][i]
                seconds += done["seconds"]
                bar.update(len(rows))
                continue
            batch = tokenizer(
                [prompts[i] for i in rows],
                add_special_tokens=False,
                padding=True,
                return_tensors="pt",
            ).to(model.device)
            began = time.perf_counter()
            generated = generate_greedy(
                model,
                tokenizer,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens,
                stop,
            )
            spent = time.perf_counter() - began
            seconds += spent
            # a recovery before, in the same process, leaves a fragmented heap: with this and
            # the recovery's own trims the study's process held 2.2-3.1 GB through the
            # evaluation after a recovery, against up to 7.4 GB before (runs/rss.log)
            release_free_memory()
            for i, row in enumerate(rows):
                texts[row] = generated.texts[i].strip()
                counts[row], finished[row] = generated.n_tokens[i], generated.finished[i]
            if journal is not None:
                journal.record(
                    start,
                    [texts[r] for r in rows],
                    [counts[r] for r in rows],
                    [finished[r] for r in rows],
                    spent,
                )
            bar.update(len(rows))
    return Generations(texts, counts, finished, seconds)


def reference_nll(
    model,
    tokenizer,
    problems: list[Problem],
    *,
    prompt: str,
    shots: int,
    batch_size: int,
    progress: bool = True,
) -> torch.Tensor:
    """Per problem: mean NLL (nats/token) of the reference solution after its prompt, and the
    probability of its final answer (``utility.base.answer_probability``): two (n,) tensors.

    A prompt that fills the model's context is cut from the left, so the solution is scored.
    """
    max_length = getattr(model.config, "max_position_embeddings", 2048)
    order = sorted(
        range(len(problems)), key=lambda i: -len(problems[i].question + problems[i].answer)
    )
    nll = torch.full((len(problems),), math.nan)
    answer = torch.full((len(problems),), math.nan)
    with tqdm(total=len(problems), desc="perplexity", unit="problem", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = build_batch(
                tokenizer,
                [problems[i] for i in rows],
                prompt=prompt,
                shots=shots,
                max_length=max_length,
                device=model.device,
            )
            nll[rows] = solution_nll(model, batch).float().cpu()  # (b,) NaN: nothing scored
            answer[rows] = answer_probability(model, batch).float().cpu()  # (b,)
            bar.update(len(rows))
    return nll, answer


def _reference_pass(model, tokenizer, problems: list[Problem], config: EvalConfig, progress: bool):
    """:func:`reference_nll` as an evaluation with ``config`` runs it."""
    return reference_nll(
        model,
        tokenizer,
        problems,
        prompt=config.prompt,
        shots=config.shots,
        batch_size=config.batch_size,
        progress=progress,
    )


def evaluate(
    config: EvalConfig,
    *,
    model=None,
    tokenizer=None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Generate greedy solutions to the first ``config.limit`` problems and score them.

    Args:
        config: what to evaluate and how; ``config.model`` is loaded unless ``model`` is given.
        model, tokenizer: an already loaded model (used as is: config.dtype/device are ignored).
            ``config.model`` is still reported as the spec and sizes the files on disk, so
            make it describe the given model (a label that is not a path gives size None).
        out_dir: if given, write generations.jsonl, then summary.json, each atomically.
        progress: show tqdm bars for generation and the perplexity pass.
    """
    began = time.perf_counter()
    if (model is None) != (tokenizer is None):
        raise ConfigError("give both model and tokenizer, or neither to load config.model")
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    model.eval()
    problems = first_problems(config.split, config.limit)
    shots = exemplars(config.shots)
    prompts = [format_prompt(tokenizer, p.question, config.prompt, shots) for p in problems]
    journal = None
    if out_dir is not None:  # a killed evaluation resumes at its first unfinished batch
        identity = {"config": config.to_dict(), "weights": weights_digest(model),
                    "prompts": text_digest(prompts)}  # fmt: skip
        journal = BatchJournal(Path(out_dir) / JOURNAL, identity)
        if journal.done:
            done = sum(len(entry["texts"]) for entry in journal.done.values())
            print(f"resuming {out_dir}: {done} of {len(prompts)} problems generated before",
                  file=sys.stderr, flush=True)  # fmt: skip
    generations = generate_solutions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        stop="question" if config.prompt == "plain" else "none",
        progress=progress,
        journal=journal,
    )
    nll, answer_probs = _reference_pass(model, tokenizer, problems, config, progress)
    scores = score_texts(
        generations.texts,
        [p.answer for p in problems],
        config.weights,
        finished=generations.finished,
        answer_probs=answer_probs.tolist(),
        accuracy_rule=config.accuracy,
        lexical=config.lexical,
    )
    records = _records(problems, generations, nll, scores.per_item)
    summary = _summarise(config, records, nll, generations, model)
    summary["wall_s"] = time.perf_counter() - began
    summary["config"] = config.to_dict()
    result = EvalResult(summary=summary, records=records)
    if out_dir is not None:
        write_result(result, Path(out_dir))
        journal.discard()
    return result


def write_result(result: EvalResult, out: Path) -> None:
    """Write out/generations.jsonl, then out/summary.json (last: its presence means complete)."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records)
    atomic_write_text(out / "generations.jsonl", lines)
    atomic_write_json(out / "summary.json", result.summary)


def add_lm_eval_accuracies(out: str | Path) -> bool:
    """Score a saved evaluation (``out``: generations.jsonl and summary.json) with
    lm-evaluation-harness's two rules if it predates them; True if it changed anything.

    They read only the generated text, so a cached study cell gains the figures without a
    re-run. Files are rewritten atomically, generations first (as :func:`write_result` does).
    """
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    keys = {f"accuracy_{name}": rule for name, rule in LM_EVAL_RULES.items()}
    if all(key in summary for key in keys):
        return False
    lines = (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    for record in records:
        for key, rule in keys.items():
            record[key] = rule(record["prediction"], record["reference"])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out / "generations.jsonl", text)
    for key in keys:
        hits = [r[key] for r in records]
        summary[key] = float(np.mean(hits)) if hits else None
        summary[f"{key}_ci"] = list(wilson_interval(sum(hits), len(hits))) if hits else None
    atomic_write_json(out / "summary.json", summary)
    return True


def add_answer_probabilities(out: str | Path, model, tokenizer, progress: bool = True) -> bool:
    """Give a saved evaluation (``out``) made before the answer probability was reported (it
    was computed, but kept only where U† weighed it) that figure, from ``model``, the model it
    evaluated; True if it changed anything.

    Only the teacher-forced reference pass runs again. It recomputes each problem's reference
    NLL too, which must equal the saved one (same model, same code, same batches): a mismatch
    means another model, and raises with nothing written.
    """
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if summary.get("answer_prob") is not None:
        return False
    config = EvalConfig.from_dict(summary["config"])
    lines = (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    problems = first_problems(config.split, len(records))
    nll, answer = _reference_pass(model, tokenizer, problems, config, progress)
    saved = torch.tensor(
        [math.nan if r["reference_nll"] is None else r["reference_nll"] for r in records]
    )
    if not torch.allclose(nll, saved, rtol=0.0, atol=1e-4, equal_nan=True):
        gap = float((nll - saved).abs().nan_to_num(0.0).max())
        raise DataError(
            f"{out}: the reference NLL recomputed differs from the saved one by up to {gap:.3g} "
            "nats/token: the model given (or its dtype) is not the one evaluated there; "
            "pass that model"
        )
    for record, value in zip(records, answer.tolist(), strict=True):
        record["answer_prob"] = _finite(value)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out / "generations.jsonl", text)
    values = [r["answer_prob"] for r in records if r["answer_prob"] is not None]
    summary["answer_prob"] = float(np.mean(values)) if values else None
    summary["answer_prob_ci"] = (
        list(bootstrap_ci(values, config.n_bootstrap, config.seed)) if values else None
    )
    atomic_write_json(out / "summary.json", summary)
    return True


def _records(
    problems: list[Problem], generations: Generations, nll: torch.Tensor, per_item: list[dict]
) -> list[dict]:
    """One JSON-ready dict per problem: the texts, the tokens generated and every metric."""
    texts, counts, finished = generations.texts, generations.n_new_tokens, generations.finished
    rows = zip(problems, texts, counts, finished, nll.tolist(), per_item, strict=True)
    return [
        {
            "index": i,
            "question": problem.question,
            "reference": problem.answer,
            "prediction": text,
            "n_new_tokens": n_new,
            "finished": done,
            "reference_nll": _finite(item_nll),
            **item,
        }
        for i, (problem, text, n_new, done, item_nll, item) in enumerate(rows)
    ]


def _summarise(
    config: EvalConfig, records: list[dict], nll: torch.Tensor, generations: Generations, model
) -> dict:
    summary: dict = {"model": config.model, "n": len(records)}
    for key in MEAN_METRICS:
        values = [r[key] for r in records if r[key] is not None]
        summary[key] = float(np.mean(values)) if values else None
        if key in CI_METRICS and values:
            if key in PROPORTIONS:
                summary[f"{key}_ci"] = list(wilson_interval(sum(values), len(values)))
            else:
                summary[f"{key}_ci"] = list(bootstrap_ci(values, config.n_bootstrap, config.seed))
        elif key in CI_METRICS:
            summary[f"{key}_ci"] = None
    summary["n_finished"] = sum(bool(r["finished"]) for r in records)
    summary["ci_level"] = CI_LEVEL
    scored = nll[~torch.isnan(nll)]  # (n_scored,)
    mean_nll = float(scored.mean()) if scored.numel() else math.nan
    summary["reference_nll"] = _finite(mean_nll)
    summary["reference_perplexity"] = _finite(math.exp(mean_nll)) if mean_nll < 700 else None
    summary.update(_model_size(model, config.model))
    n_tokens = sum(generations.n_new_tokens)
    summary["n_new_tokens"] = n_tokens
    summary["generation_s"] = generations.seconds
    summary["decode_tokens_per_s"] = n_tokens / generations.seconds if generations.seconds else None
    summary.update(_peak_memory(model))
    return summary


def _finite(value: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite figure is reported as None."""
    return value if math.isfinite(value) else None


def _model_size(model, spec: str) -> dict:
    """Parameter counts and bytes in memory, and bytes of the model's files on disk."""
    try:
        non_embedding = adapter_for(model).count_parameters(model)
    except UnsupportedModelError:
        non_embedding = None
    parameters = list(model.parameters())  # tied weights appear once
    return {
        "non_embedding_params": non_embedding,
        "total_params": sum(p.numel() for p in parameters),
        "param_bytes": sum(p.numel() * p.element_size() for p in parameters),
        "size_on_disk_bytes": size_on_disk(spec),
    }


def size_on_disk(spec: str) -> int | None:
    """Bytes of a model's files: a model or run directory (its model/ folder), or the packaged
    GGUF for "default"; None for a hub id or a label that names no files."""
    if spec == DEFAULT_MODEL:
        try:
            return packaged_gguf().stat().st_size
        except ModelLoadError:
            return None
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    if is_pruned_dir(path) and (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _peak_memory(model) -> dict:
    """Peak resident memory of this process (since it started), and peak CUDA allocation."""
    on_cuda = model.device.type == "cuda"
    return {
        "peak_rss_bytes": peak_resident_bytes(),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(model.device) if on_cuda else None,
    }


def format_summary(summary: dict) -> str:
    """A short human-readable table of an evaluation summary, with confidence intervals."""
    level = round(100 * summary.get("ci_level", CI_LEVEL))

    def ratio(key: str, scale: float = 100.0, unit: str = "%") -> str:
        value, ci = summary.get(key), summary.get(f"{key}_ci")
        if value is None:
            return "n/a"
        text = f"{scale * value:.1f}{unit}"
        if ci:
            text += f"  [{scale * ci[0]:.1f}, {scale * ci[1]:.1f}] {level}% CI"
        return text

    def optional(key: str, fmt: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else fmt.format(value)

    rows = [
        ("model", f"{summary.get('model')}  (n={summary.get('n')})"),
        ("accuracy (strict)", ratio("accuracy_strict")),
        ("accuracy (flexible)", ratio("accuracy_flexible")),
        ("accuracy (contains)", ratio("accuracy_contains")),
        ("lm-eval strict-match", ratio("accuracy_strict_match")),
        ("lm-eval flexible-extract", ratio("accuracy_flexible_extract")),
        ("lexical", optional("lexical", "{:.3f}")),
        ("semantic", optional("semantic", "{:.3f}")),
        ("U† (0-100)", ratio("u_dagger", scale=1.0, unit="")),
        ("answer probability", ratio("answer_prob")),
        ("reference perplexity", optional("reference_perplexity", "{:.2f}")),
        (
            "params (non-emb / all)",
            f"{_millions(summary.get('non_embedding_params'))} / "
            f"{_millions(summary.get('total_params'))}",
        ),
        ("size on disk", _megabytes(summary.get("size_on_disk_bytes"))),
        ("decode", optional("decode_tokens_per_s", "{:.1f} tokens/s")),
        ("generation time", optional("generation_s", "{:.1f} s")),
        ("peak RSS", _megabytes(summary.get("peak_rss_bytes"))),
        ("wall time", optional("wall_s", "{:.1f} s")),
    ]
    if summary.get("peak_cuda_bytes") is not None:
        rows.insert(-1, ("peak CUDA memory", _megabytes(summary["peak_cuda_bytes"])))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _millions(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 1e6:.2f}M"


def _megabytes(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.1f} MiB"
