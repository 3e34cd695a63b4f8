"""Which utilities rank damage? Round 1 of a Bonsai run, scored by many utilities at once.

``measure_validity(config)`` runs round 1 without slicing: the prior, the sampled masks, every
sub-model's greedy solutions and teacher-forced likelihoods, then, for each utility variant,
the validity figures of ``utility/validity.py`` and the ridge regression's chosen penalty and
held-out R^2. The expensive part is shared: one generation per prompt setting, at the largest
token cap any variant uses; a variant with a smaller cap reads the first tokens of it (greedy
decoding makes those the tokens a run with that cap would write). Variants with ``stop="none"``
read the same generation, which stops after the answer line; ``rows_cut_short`` counts the
rows where that ended the text before the variant's cap, i.e. where it differs from a real run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from bonsai_prune.config import PruneConfig, UtilityConfig
from bonsai_prune.core.budget import prunable_mask, round_budget
from bonsai_prune.core.priors import fixed_units
from bonsai_prune.core.regression import fit_importance
from bonsai_prune.core.sampling import sample_masks
from bonsai_prune.data.calibration import CalibrationBatch, build_batch, calibration_problems
from bonsai_prune.data.problems import load_gsm8k, load_problems
from bonsai_prune.data.prompts import worked_solution
from bonsai_prune.methods.bonsai import MAX_SAMPLE_FRACTION, round_generator
from bonsai_prune.methods.forward import unit_prior
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.utility.combine import score_texts
from bonsai_prune.utility.comprehensive import original_study_config
from bonsai_prune.utility.generation import Generated, generate_greedy
from bonsai_prune.utility.references import gold_texts, prefix_text
from bonsai_prune.utility.semantic import SemanticScorer
from bonsai_prune.utility.validity import measure_validity as validity_of
from bonsai_prune.utility.validity import removed_parameters

PERPLEXITY = None  # a variant whose utility is None is Bonsai's -log perplexity


def issue_variants(default: UtilityConfig) -> list[tuple[str, UtilityConfig | None]]:
    """The utilities of issue 13's table, around ``default`` (the proposed pruning settings)."""
    original = original_study_config()
    mix = {"acc": 34, "lex": 33, "sem": 33}
    return [
        ("perplexity", PERPLEXITY),
        ("original 38/38/24, 20-token gold prefix", original),
        (
            "34/33/33, 20-token gold prefix (study 1)",
            replace(original, weights=mix, accuracy="strict", lexical="rouge_numbers"),
        ),
        ("accuracy only (strict)", replace(default, weights={"acc": 100})),
        ("accuracy only (contains)", replace(default, weights={"acc": 100}, accuracy="contains")),
        ("answer probability only", replace(default, weights={"prob": 100})),
        ("lexical only, self", replace(default, weights={"lex": 100})),
        ("semantic only, self", replace(default, weights={"sem": 100})),
        ("34/33/33, self", replace(default, weights=mix)),
        ("34/33/33, gold + 2 exemplars", replace(default, weights=mix, reference="gold", shots=2)),
        ("default", default),
    ]


def measure_validity(
    config: PruneConfig,
    variants: Sequence[tuple[str, UtilityConfig | None]] | None = None,
    *,
    model=None,
    tokenizer=None,
    progress: bool = False,
) -> dict:
    """Round-1 validity figures of each utility variant on ``config.model``: a JSON-ready dict.

    ``variants``: (name, UtilityConfig or None for perplexity); default ``issue_variants``
    around ``config.utility``. The masks are those round 1 of ``config`` would sample.
    """
    began = time.perf_counter()
    variants = list(variants or issue_variants(config.utility))
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    model.eval()
    adapter = adapter_for(model)
    device = next(model.parameters()).device
    pool = load_problems(config.data) if config.data else load_gsm8k("train")
    problems = calibration_problems(pool, config.calib_samples, config.seed, 1)

    generator = round_generator(config.seed, 1)
    layout = adapter.layout(model)
    n_params = adapter.count_parameters(model)
    budget = round_budget(n_params, n_params, config.sparsity, config.prune_fraction)
    fraction = min(MAX_SAMPLE_FRACTION, budget / n_params)
    batch = _batch(tokenizer, problems, config.utility, device)
    prior = unit_prior(adapter, model, batch, config.prior, generator)
    fixed = fixed_units(prior, layout.module_index, fraction) | ~prunable_mask(
        layout, config.unit_kinds
    )
    masks = sample_masks(
        prior,
        fixed,
        layout.module_index,
        fraction,
        config.masks_per_round // 2,
        generator=generator,
        removal_counts=config.removal_counts,
    )  # (N, U)
    candidates = ~fixed
    n_removed = (~masks[:, candidates]).sum(1)  # (N,) units
    removed = removed_parameters(masks, adapter.unit_costs(model))  # (N,) parameters
    all_masks = torch.cat([torch.ones_like(masks[:1]), masks])  # (1 + N, U): row 0 unmasked

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    nll, answer_prob = _teacher_forced(model, adapter, batch, all_masks)  # (1+N, n) each
    timings["teacher_forced_s"] = time.perf_counter() - clock
    if progress:
        print(f"  teacher-forced {all_masks.shape[0]} sub-models", flush=True)
    generations: dict[tuple, list[Generated]] = {}
    for setting in {_setting(u) for _, u in variants if u is not None}:
        clock = time.perf_counter()
        prompt, shots = setting
        cap = max(u.gen_tokens for _, u in variants if u is not None and _setting(u) == setting)
        setting_batch = _batch(tokenizer, problems, _with(config.utility, prompt, shots), device)
        generations[setting] = _generate_all(
            model, adapter, setting_batch, all_masks, cap, config.masks_per_forward, progress
        )
        timings[f"generation_s {prompt} {shots}-shot cap {cap}"] = time.perf_counter() - clock

    semantic = SemanticScorer()
    rows = []
    for name, utility in variants:
        clock = time.perf_counter()
        if utility is None:
            scores = -nll.nanmean(dim=1)  # (1+N,)
            cut_short = 0
        else:
            scores, cut_short = _u_dagger_scores(
                utility, generations[_setting(utility)], problems, tokenizer, answer_prob, semantic
            )
        rows.append(
            _figures(name, utility, scores.double(), removed, masks[:, candidates], cut_short)
        )
        rows[-1]["scoring_s"] = time.perf_counter() - clock
    return {
        "model": config.model,
        "dtype": str(next(model.parameters()).dtype),
        "n_masks": int(masks.shape[0]),
        "n_problems": len(problems),
        "n_candidates": int(candidates.sum()),
        "sample_fraction": fraction,
        "units_removed_range": [int(n_removed.min()), int(n_removed.max())],
        "config": config.to_dict(),
        "variants": rows,
        "timings": timings,
        "wall_s": time.perf_counter() - began,
    }


def _setting(utility: UtilityConfig) -> tuple[str, int]:
    return (utility.prompt, utility.shots)


def _with(utility: UtilityConfig, prompt: str, shots: int) -> UtilityConfig:
    reference = utility.reference if shots or utility.reference != "gold" else "self"
    return replace(utility, prompt=prompt, shots=shots, reference=reference)


def _batch(tokenizer, problems, utility: UtilityConfig, device) -> CalibrationBatch:
    return build_batch(
        tokenizer,
        problems,
        prompt=utility.prompt,
        shots=utility.shots,
        max_length=utility.max_length,
        device=device,
    )


@torch.no_grad()
def _teacher_forced(model, adapter, batch: CalibrationBatch, masks: torch.Tensor):
    """Per sub-model and problem: mean NLL of the gold solution, and the gold answer's
    per-token probability: two (G, n) tensors. One masked forward per sub-model."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    n = batch.input_ids.shape[0]
    nll = torch.empty(masks.shape[0], n, dtype=torch.float64)
    answer = torch.empty(masks.shape[0], n, dtype=torch.float64)
    target = batch.target_mask  # (n, L)
    labels = torch.roll(batch.input_ids, shifts=-1, dims=1)[target]  # (n_scored,)
    row = torch.nonzero(target)[:, 0]  # (n_scored,)
    is_answer = batch.answer_mask[target]  # (n_scored,)
    for g in range(masks.shape[0]):
        with adapter.apply_masks(model, masks[g]):
            hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        logits = head(hidden.last_hidden_state[target]).float()  # (n_scored, V)
        token_nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none").double()
        total = torch.zeros(n, dtype=torch.float64).index_add_(0, row.cpu(), token_nll.cpu())
        nll[g] = total / torch.bincount(row.cpu(), minlength=n).clamp(min=1)
        on_answer = torch.zeros(n, dtype=torch.float64).index_add_(
            0, row[is_answer].cpu(), token_nll[is_answer].cpu()
        )
        count = torch.bincount(row[is_answer].cpu(), minlength=n)
        answer[g] = torch.where(count > 0, torch.exp(-on_answer / count.clamp(min=1)), math.nan)
    return nll, answer


def _generate_all(model, adapter, batch, masks, cap: int, per_forward: int, progress: bool):
    """Greedy generations of every sub-model (G masks): a list of G Generated of n rows."""
    n, out = batch.prompt_ids.shape[0], []
    for start in range(0, masks.shape[0], per_forward):
        chunk = masks[start : start + per_forward]  # (g, U)
        with adapter.apply_masks(model, chunk.repeat_interleave(n, dim=0)):
            generated = generate_greedy(
                model,
                batch.tokenizer,
                batch.prompt_ids.repeat(len(chunk), 1),
                batch.prompt_attention_mask.repeat(len(chunk), 1),
                cap,
                "answer",
            )
        for g in range(len(chunk)):
            rows = slice(g * n, (g + 1) * n)
            out.append(
                Generated(
                    generated.texts[rows],
                    generated.token_ids[rows],
                    generated.n_tokens[rows],
                    generated.finished[rows],
                )
            )
        if progress:
            print(f"  generated {len(out)}/{masks.shape[0]} sub-models", flush=True)
    return out


def _view(
    generated: Generated, tokenizer, cap: int
) -> tuple[list[str], list[int], list[bool], int]:
    """The generation as a run with token cap ``cap`` would have written it."""
    texts, counts, finished, cut_short = [], [], [], 0
    for text, ids, n, done in zip(
        generated.texts, generated.token_ids, generated.n_tokens, generated.finished, strict=True
    ):
        if n > cap:
            texts.append(tokenizer.decode(ids[:cap], skip_special_tokens=True))
            counts.append(cap)
            finished.append(False)
        else:
            texts.append(text)
            counts.append(n)
            finished.append(done)
            cut_short += int(done and n < cap and tokenizer.eos_token_id not in ids)
    return texts, counts, finished, cut_short


def _u_dagger_scores(utility, generations, problems, tokenizer, answer_prob, semantic):
    """U† (G,) of every sub-model under ``utility``; rows cut short by the answer stop."""
    dense_texts = _view(generations[0], tokenizer, utility.gen_tokens)[0]
    answers = [p.answer for p in problems]
    scores, cut_short = [], 0
    for g, generated in enumerate(generations):
        texts, counts, finished, cut = _view(generated, tokenizer, utility.gen_tokens)
        cut_short += cut if utility.stop == "none" else 0
        if utility.reference == "self":
            references = dense_texts
        elif utility.reference == "gold":
            references = gold_texts(tokenizer, problems, counts, finished)
        else:
            references = [
                prefix_text(tokenizer, worked_solution(p), utility.gen_tokens) for p in problems
            ]
        result = score_texts(
            texts,
            references,
            utility.weights,
            answers=answers,
            finished=finished,
            answer_probs=answer_prob[g].tolist(),
            accuracy_rule=utility.accuracy,
            lexical=utility.lexical,
            semantic_scorer=semantic,
        )
        scores.append(result.aggregate["u_dagger"])
    return torch.tensor(scores, dtype=torch.float64), cut_short


def _figures(name, utility, scores, removed, design, cut_short) -> dict:
    """The validity row of one variant: scores (1+N,) with the unmasked model first."""
    before, sub = float(scores[0]), scores[1:]
    fit = fit_importance(design, sub, method="ridge")
    validity = validity_of(before, sub, removed, fit.cv_error, fit.at_max_penalty)
    return {
        "name": name,
        "utility": None if utility is None else utility.to_dict(),
        "unmasked": before,
        "sub_model_mean": float(sub.mean()),
        "sub_model_min": float(sub.min()),
        "sub_model_max": float(sub.max()),
        **validity.to_dict(),
        "ridge_alpha": fit.alpha,
        "ridge_alpha_is_grid_max": fit.at_max_penalty if fit.alpha else None,
        "rows_cut_short": cut_short,
        "scores": scores.tolist(),  # unmasked first, then each sub-model: figures can be redone
        "removed_parameters": removed.tolist(),
    }
