"""``bonsai-prune bench``: where pruning time goes, and what slicing buys, measured in one run.

Every ratio compares two measurements taken in the same run on the same machine:

* sub-model evaluation, the project's path against a *reference loop* written the way the
  original Bonsai code works (fp32, one mask at a time, masks in Python hooks, the LM head at
  every position; for U†, one prompt at a time), on the same masks and calibration problems;
* the model FLOP/s of that evaluation against this machine's measured matmul peak;
* decode/prefill speed, memory and size of sliced models against the dense one. Speed depends
  only on the shapes, so the 30% and 50% models are sliced at random units under the same
  parameter budget Bonsai uses (measuring a Bonsai-chosen model of the same shapes is equal);
* the wall time and peak memory of a real pruning run against plain inference;
* the time to 50% sparsity with Bonsai's own budget (5% per round, 200 sub-models, 8
  problems, perplexity), *projected* from the measured cost of one evaluation, the prior and a
  ridge fit of that size and a compensation (``project_search``), against the bound its FLOPs
  set at the peak.

Memory is each child process's own peak (VmHWM), so each figure is that job's alone. Timed
comparisons alternate their two sides, so a busy machine slows both alike.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MATMUL_SHAPE = (2048, 576, 1536)  # a token batch through one MLP projection of the default model


@dataclass(frozen=True)
class BenchConfig:
    quick: bool = True
    model: str = "default"
    n_masks: int = 8  # at least one full group of the default masks_per_forward
    calib_samples: int = 4
    decode_tokens: int = 32
    seed: int = 0
    dtype: str = "auto"  # of the project's path; the reference loop is always fp32

    @classmethod
    def make(cls, quick: bool, model: str = "default", dtype: str = "auto") -> BenchConfig:
        if quick:
            return cls(quick, model, dtype=dtype)
        return cls(False, model, 16, 8, 128, dtype=dtype)


def matmul_gflops(dtype: torch.dtype, repeats: int = 10, trials: int = 5) -> float:
    """Peak GFLOP/s of a (2048x576)@(576x1536) matmul in ``dtype``: the best of ``trials``
    timings of ``repeats`` products (one timing read 109 GFLOP/s where another run read 128,
    and the model's own FLOP/s then came out above the "peak")."""
    m, k, n = MATMUL_SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(trials):
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * m * k * n * repeats / best / 1e9


# ---- sub-model evaluation: project path vs reference loop -----------------------------------


@torch.no_grad()
def reference_perplexity(model, batch, utility=None) -> float:
    """-mean NLL of solution tokens, the original way: full-vocabulary logits at every position.
    ``utility`` is unused: every reference scorer takes ``(model, batch, utility)``."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    labels = torch.roll(batch.input_ids, -1, dims=1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    per_problem = (nll * batch.target_mask).sum(1) / batch.target_mask.sum(1)
    return -float(per_problem.mean())


@torch.no_grad()
def reference_generate(
    model, tokenizer, prompt_ids: torch.Tensor, n_new: int, stop: str = "none"
) -> tuple[str, int, bool]:
    """Greedy decoding of one prompt with logits over the whole vocabulary at every position:
    (text, tokens generated, whether it ended by itself)."""
    from bonsai_prune.core.metrics import STOP_PATTERNS
    from bonsai_prune.models.decoding import cache_keyword

    pattern = STOP_PATTERNS[stop]
    keyword = cache_keyword(model)
    output = model(input_ids=prompt_ids, use_cache=True)
    cache, tokens = output[keyword], []
    for _ in range(n_new):
        token = output.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(token))
        if int(token) == tokenizer.eos_token_id:
            return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), True
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if pattern is not None and pattern.search(text):
            return text, len(tokens), True
        output = model(input_ids=token, use_cache=True, **{keyword: cache})
    return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), False


def reference_u_dagger(model, batch, utility) -> float:
    from bonsai_prune.utility.base import answer_probability
    from bonsai_prune.utility.generation import Generated

    rows = []
    for row in range(batch.prompt_ids.shape[0]):
        ids = batch.prompt_ids[row : row + 1][:, batch.prompt_attention_mask[row].bool()]
        config = utility.config
        rows.append(reference_generate(model, batch.tokenizer, ids, config.gen_tokens, config.stop))
    texts, counts, finished = (list(column) for column in zip(*rows, strict=True))
    generated = Generated(texts, [[] for _ in texts], counts, finished)
    probs = answer_probability(model, batch) if utility.config.weights["prob"] > 0 else None
    return utility.score_generated(batch, generated, probs)


def attention_flops(adapter, model, lengths: list[int]) -> int:
    """FLOPs of causal attention (scores and weighted sum, the causal half only) over rows of
    these lengths: the part of a forward that is not a matrix product with a weight."""
    from bonsai_prune.models.adapter import HEADS

    channels = sum(
        linear.in_features  # heads x head_dim of the layer's o_proj
        for (_, kind), (linear, _) in adapter.output_projections(model).items()
        if kind == HEADS
    )
    return sum(2 * 2 * channels * length * (length + 1) // 2 for length in lengths)


def evaluation_flops(adapter, model, batch, padded: bool) -> dict:
    """FLOPs of one perplexity evaluation of ``batch``: the body's weights over every token,
    attention, and the LM head over the scored tokens; ``padded``: the reference loop's work
    (padded rows, the LM head at every position)."""
    lengths = batch.attention_mask.sum(1).tolist()
    if padded:
        lengths = [batch.attention_mask.shape[1]] * len(lengths)
    tokens = sum(lengths)
    head_tokens = tokens if padded else batch.n_target_tokens
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    return {
        "body": 2 * adapter.count_parameters(model) * tokens,
        "attention": attention_flops(adapter, model, lengths),
        "head": 2 * hidden * vocab * head_tokens,
    }


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _timed(fn):
    began = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - began


def bench_evaluation(config: BenchConfig, progress: bool) -> dict:
    """Evaluations per second and utility agreement, project path vs reference loop."""
    from bonsai_prune.config import PruneConfig, UtilityConfig
    from bonsai_prune.core.priors import fixed_units
    from bonsai_prune.core.sampling import sample_masks
    from bonsai_prune.data.calibration import build_batch
    from bonsai_prune.data.problems import load_gsm8k, sample_problems
    from bonsai_prune.methods.forward import score_masks
    from bonsai_prune.models import adapter_for, load_model
    from bonsai_prune.utility import resolve_utility
    from bonsai_prune.utility.references import prepare_self_references

    fast_model, tokenizer = load_model(config.model, dtype=config.dtype)
    ref_model, _ = load_model(config.model, dtype="fp32")
    adapter = adapter_for(fast_model)
    layout = adapter.layout(fast_model)
    problems = sample_problems(load_gsm8k("train"), config.calib_samples, seed=config.seed)
    batch = build_batch(tokenizer, problems)
    generator = torch.Generator().manual_seed(config.seed)
    prior = torch.rand(layout.n_units, generator=generator, dtype=torch.float64)
    fixed = fixed_units(prior, layout.module_index, 0.1)
    masks = sample_masks(
        prior, fixed, layout.module_index, 0.1, config.n_masks // 2, generator=generator
    )
    per_forward = PruneConfig().masks_per_forward
    figures: dict = {
        "n_masks": config.n_masks,
        "calib_samples": config.calib_samples,
        "fast_dtype": str(fast_model.dtype).removeprefix("torch."),
    }

    for name in ("perplexity", "comprehensive"):
        utility = resolve_utility(UtilityConfig(name=name))
        prepare_self_references(utility, ref_model, tokenizer, problems)
        reference_score = reference_perplexity if name == "perplexity" else reference_u_dagger
        # warm-up of both paths on the shapes they will time: kernels, the embedding model
        score_masks(adapter, fast_model, utility, batch, masks[:per_forward], per_forward, False)
        with adapter.apply_masks(ref_model, masks[0]):
            reference_score(ref_model, batch, utility)
        fast, reference, fast_s, reference_s = [], [], 0.0, 0.0
        # Alternate the two paths group by group, so load from other jobs hits both alike.
        for start in range(0, len(masks), per_forward):
            group = masks[start : start + per_forward]
            values, seconds = _timed(
                lambda g=group, u=utility: score_masks(
                    adapter, fast_model, u, batch, g, per_forward, False
                )
            )
            fast += values.tolist()
            fast_s += seconds
            for keep in group:
                with adapter.apply_masks(ref_model, keep):
                    value, seconds = _timed(
                        lambda f=reference_score, u=utility: f(ref_model, batch, u)
                    )
                reference.append(value)
                reference_s += seconds
        figures[name] = {
            "fast_evals_per_s": len(masks) / fast_s,
            "reference_evals_per_s": len(masks) / reference_s,
            "eval_speedup_vs_reference": reference_s / fast_s,
            "utility_rank_corr": spearman(fast, reference),
            "fast_s_per_eval": fast_s / len(masks),
        }
        if name == "perplexity":
            # each problem's rows run unpadded; the reference pads and projects every position
            flops = evaluation_flops(adapter, fast_model, batch, padded=False)
            reference_flops = evaluation_flops(adapter, fast_model, batch, padded=True)
            total = sum(flops.values())
            figures[name]["model_gflops_per_s"] = total * len(masks) / fast_s / 1e9
            figures[name]["body_flops_per_eval"] = flops["body"] + flops["attention"]
            figures[name]["head_flops_per_eval"] = flops["head"]
            figures[name]["attention_share_of_flops"] = flops["attention"] / total
            # the speed-up that computing less gives at equal FLOP/s: the ceiling of a
            # FLOP-bound evaluation against a reference running at the same efficiency
            figures[name]["flop_ratio_vs_reference"] = sum(reference_flops.values()) / total
    figures["round_overhead"] = _round_overhead(
        adapter, fast_model, batch, generator, tokenizer, masks[0]
    )
    return figures


def _round_overhead(adapter, model, batch, generator, tokenizer, keep: torch.Tensor) -> dict:
    """Seconds a round spends outside sub-model evaluation at Bonsai's budget: the prior's
    forward passes (on ``batch``), a ridge fit on Bonsai's 200 masks over the candidates
    that a 5% round leaves (random data: the fit's cost depends only on the shape), and the
    default compensation before the slice (``keep``, on a copy of the model)."""
    import copy

    from bonsai_prune.config import PruneConfig
    from bonsai_prune.core.priors import fixed_units
    from bonsai_prune.core.regression import fit_importance
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.methods.base import compensation_for
    from bonsai_prune.methods.forward import unit_prior
    from bonsai_prune.models.compensation import refit_outputs

    layout = adapter.layout(model)
    prior, prior_s = _timed(lambda: unit_prior(adapter, model, batch, "wanda", generator))
    n_candidates = int(
        (~fixed_units(prior, layout.module_index, BONSAI_BUDGET["prune_fraction"])).sum()
    )
    masks = torch.rand((BONSAI_BUDGET["masks_per_round"], n_candidates), generator=generator) < 0.5
    scores = torch.randn(masks.shape[0], generator=generator, dtype=torch.float64)
    _, regression_s = _timed(lambda: fit_importance(masks, scores))
    compensation = compensation_for(model, tokenizer, load_gsm8k("train"), PruneConfig())
    scratch = copy.deepcopy(model)  # the refit writes the weights the other timings use
    _, compensation_s = _timed(lambda: refit_outputs(adapter, scratch, keep, compensation))
    return {
        "prior_s": prior_s,
        "prior_problems": int(batch.input_ids.shape[0]),
        "regression_s": regression_s,
        "compensation_s": compensation_s,
        "n_candidates": n_candidates,
    }


BONSAI_BUDGET = {
    "sparsity": 0.5,
    "prune_fraction": 0.05,
    "masks_per_round": 200,
    "calib_samples": 8,
}


def project_search(
    seconds_per_eval: float,
    problems_measured: int,
    body_flops: float,
    head_flops: float,
    peak_flops_per_s: float,
    overhead: dict,
    budget: dict = BONSAI_BUDGET,
) -> dict:
    """Time to prune to ``budget["sparsity"]`` with Bonsai's budget, projected from measured
    per-evaluation and per-round costs, and the lower bound the evaluations' FLOPs set at the
    measured matmul peak.

    Round r (0-based) starts with ``1 - r * prune_fraction`` of the non-embedding parameters;
    the body's share of an evaluation's cost shrinks with them, the LM head's does not. Costs
    measured on ``problems_measured`` calibration problems scale linearly to the budget's;
    compensation (``overhead["compensation_s"]``, one measured refit) shrinks with the body.
    """
    rounds = math.ceil(round(budget["sparsity"] / budget["prune_fraction"], 9))
    per_problem = budget["calib_samples"] / problems_measured
    prior_scale = budget["calib_samples"] / overhead["prior_problems"]
    total = bound = evaluation = 0.0
    for r in range(rounds):
        left = 1 - r * budget["prune_fraction"]
        share = (body_flops * left + head_flops) / (body_flops + head_flops)
        evals = budget["masks_per_round"] * seconds_per_eval * per_problem * share
        evaluation += evals
        total += evals + overhead["prior_s"] * prior_scale * left + overhead["regression_s"]
        total += overhead.get("compensation_s", 0.0) * left
        bound += budget["masks_per_round"] * (body_flops * left + head_flops) * per_problem
    bound /= peak_flops_per_s
    return {
        "budget": dict(budget),
        "rounds": rounds,
        "evaluations": rounds * budget["masks_per_round"],
        "projected_s": total,
        "projected_evaluation_s": evaluation,
        "flops_lower_bound_s": bound,
        "projected_over_lower_bound": total / bound,
        "projected": True,
    }


# ---- decode, prefill, memory, size: dense vs sliced ---------------------------------------


def slice_at_random(model, adapter, sparsity: float, seed: int) -> None:
    """Remove random units until ``sparsity`` of the non-embedding parameters are gone."""
    from bonsai_prune.core.budget import min_keep_per_module
    from bonsai_prune.core.selection import select_units

    layout = adapter.layout(model)
    scores = torch.rand(
        layout.n_units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    budget = sparsity * adapter.count_parameters(model)
    selection = select_units(
        scores,
        adapter.unit_costs(model),
        budget,
        layout.module_index,
        min_keep_per_module(adapter, layout, allow_empty=False),
    )
    adapter.slice(model, selection.keep)


def _prompts(tokenizer, n: int = 8) -> list[str]:
    from bonsai_prune.data.problems import load_gsm8k
    from bonsai_prune.data.prompts import format_prompt

    return [format_prompt(tokenizer, p.question) for p in load_gsm8k("test")[:n]]


def _speed_once(model, tokenizer, prompts: list[str], batch_size: int, decode_tokens: int) -> dict:
    from bonsai_prune.utility.generation import greedy_sequences

    inputs = tokenizer(
        prompts[:batch_size], return_tensors="pt", padding=True, add_special_tokens=False
    )
    ids, mask, pad = inputs["input_ids"], inputs["attention_mask"], tokenizer.pad_token_id
    with torch.no_grad():
        _, prefill_s = _timed(lambda: model(**inputs, logits_to_keep=1))
        # decode = generating n tokens minus generating 1 (the same prefill and set-up): not
        # minus a plain forward, whose time differs from generation's own prefill
        _, first_s = _timed(lambda: greedy_sequences(model, ids, mask, 1, pad_token_id=pad))
        _, total_s = _timed(
            lambda: greedy_sequences(model, ids, mask, decode_tokens, pad_token_id=pad)
        )
    return {
        "prefill_tokens_per_s": int(mask.sum()) / prefill_s,
        "decode_tokens_per_s": batch_size * (decode_tokens - 1) / max(total_s - first_s, 1e-9),
    }


def measure_speed(
    model_dirs: dict[str, str], decode_tokens: int, dtype: str = "auto", repeats: int = 5
) -> dict:
    """Prefill and greedy decode speed of each model, batch 1 and 8, in ``repeats`` rounds that
    visit every model in turn (interleaved, so a busy machine slows all alike): per model and
    batch size the median figures, and under ``"rounds"`` every round's (for ratios per round)."""
    from statistics import median

    from bonsai_prune.models import load_model

    loaded = {name: load_model(folder, dtype=dtype) for name, folder in model_dirs.items()}
    prompts = _prompts(next(iter(loaded.values()))[1])
    samples: dict = {name: {1: [], 8: []} for name in loaded}
    for model, tokenizer in loaded.values():  # warm-up
        _speed_once(model, tokenizer, prompts, 8, 3)
    for index in range(repeats):
        # alternate the order too, so neither side always runs first after a pause
        names = list(loaded) if index % 2 == 0 else list(reversed(loaded))
        for name in names:
            model, tokenizer = loaded[name]
            for batch_size in (1, 8):
                samples[name][batch_size].append(
                    _speed_once(model, tokenizer, prompts, batch_size, decode_tokens)
                )
    return {
        name: {
            **{
                f"batch{b}": {key: median(s[key] for s in runs) for key in runs[0]}
                for b, runs in by_batch.items()
            },
            "rounds": {f"batch{b}": runs for b, runs in by_batch.items()},
        }
        for name, by_batch in samples.items()
    }


MAX_RATIO_SPREAD = 0.25  # (max - min) / median of a ratio's rounds above this: not a result


def ratio_over_rounds(pruned: list[dict], dense: list[dict], key: str) -> dict:
    """``key``'s pruned/dense ratio in each round (both measured within it), summarised: the
    median, the range, and whether the range is narrow enough to quote (``trusted``)."""
    from statistics import median

    ratios = sorted(p[key] / d[key] for p, d in zip(pruned, dense, strict=True))
    middle = median(ratios)
    spread = (ratios[-1] - ratios[0]) / middle if middle else float("inf")
    return {
        "median": middle,
        "min": ratios[0],
        "max": ratios[-1],
        "rounds": len(ratios),
        "trusted": spread <= MAX_RATIO_SPREAD,
    }


def measure_memory(model_dir: str, decode_tokens: int, dtype: str = "auto") -> dict:
    """In a child process: load one model and generate, then report this process's own peak."""
    from bonsai_prune.models import load_model

    model, tokenizer = load_model(model_dir, dtype=dtype)
    _speed_once(model, tokenizer, _prompts(tokenizer), 8, decode_tokens)
    return {"peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(args: list[str]) -> dict:
    """Run ``python -m bonsai_prune.bench <args>`` and return the JSON it prints last."""
    done = subprocess.run(
        [sys.executable, "-m", "bonsai_prune.bench", *args], stdout=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {args[0]} failed with code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def bench_slicing(config: BenchConfig, workdir: Path) -> dict:
    from bonsai_prune.models import adapter_for, load_model
    from bonsai_prune.models.loading import dequantised_default
    from bonsai_prune.models.pruned import save_model

    dense_dir = dequantised_default() if config.model == "default" else Path(config.model)
    dirs = {"dense": dense_dir}
    for sparsity in (0.3, 0.5):
        model, tokenizer = load_model(config.model, dtype="fp32")
        adapter = adapter_for(model)
        slice_at_random(model, adapter, sparsity, config.seed)
        dirs[f"{int(sparsity * 100)}"] = save_model(
            workdir / f"sliced{int(sparsity * 100)}", model, tokenizer, adapter.structure(model)
        )
    folders = json.dumps({k: str(v) for k, v in dirs.items()})
    speed = run_child(["speed", folders, str(config.decode_tokens), config.dtype])
    measured = {}
    for name, folder in dirs.items():
        memory = run_child(["memory", str(folder), str(config.decode_tokens), config.dtype])
        measured[name] = {**speed[name], **memory, "size_on_disk_bytes": _dir_bytes(folder)}
    out = {"models": measured}
    dense = measured["dense"]
    for name in ("30", "50"):
        pruned = measured[name]
        for kind in ("decode", "prefill"):
            spread = {
                f"batch{b}": ratio_over_rounds(
                    pruned["rounds"][f"batch{b}"],
                    dense["rounds"][f"batch{b}"],
                    f"{kind}_tokens_per_s",
                )
                for b in (1, 8)
            }
            out[f"{kind}_speedup_at_{name}"] = {b: r["median"] for b, r in spread.items()}
            out[f"{kind}_speedup_spread_at_{name}"] = spread
        out[f"peak_rss_ratio_at_{name}"] = pruned["peak_rss_bytes"] / dense["peak_rss_bytes"]
        out[f"size_on_disk_ratio_at_{name}"] = (
            pruned["size_on_disk_bytes"] / dense["size_on_disk_bytes"]
        )
    return out


def bench_pruning(config: BenchConfig, workdir: Path) -> dict:
    """Wall time and peak memory of pruning the default model to 50% with U†, vs inference."""
    quick = {"masks_per_round": 4, "calib_samples": 2, "prune_fraction": 0.25}
    prune_config = {
        "model": config.model,
        "dtype": config.dtype,
        "sparsity": 0.5,
        "utility": {"name": "comprehensive"},
        **(quick if config.quick else {}),
    }
    report = run_child(["prune", json.dumps(prune_config), str(workdir / "prune50")])
    prune_peak = report["peak_rss_bytes"]
    inference_peak = run_child(["memory", config.model, str(config.decode_tokens), config.dtype])[
        "peak_rss_bytes"
    ]
    return {
        "prune_settings": prune_config,
        "prune_wall_s": report["wall_s"],
        "prune_phase_s": report["phase_seconds"],
        "prune_peak_rss_bytes": prune_peak,
        "inference_peak_rss_bytes": inference_peak,
        "prune_peak_rss_over_inference": prune_peak / inference_peak,
    }


def run_bench(config: BenchConfig, progress: bool = True) -> dict:
    """All figures of the benchmark, in one dictionary (see the module docstring)."""
    began = time.perf_counter()
    peaks = {
        "fp32": matmul_gflops(torch.float32),
        "bf16": matmul_gflops(torch.bfloat16, repeats=2, trials=2),
    }
    result: dict = {"quick": config.quick, "machine": _machine(), "matmul_gflops": peaks}
    result["evaluation"] = bench_evaluation(config, progress)
    achieved = result["evaluation"]["perplexity"]["model_gflops_per_s"]
    fast_dtype = (
        result["evaluation"]["fast_dtype"].replace("float32", "fp32").replace("bfloat16", "bf16")
    )
    result["gemm_utilisation"] = achieved / peaks[fast_dtype]
    result["gemm_utilisation_vs_bf16_peak"] = achieved / peaks["bf16"]
    ppl = result["evaluation"]["perplexity"]
    result["bonsai_budget"] = project_search(
        ppl["fast_s_per_eval"],
        config.calib_samples,
        ppl["body_flops_per_eval"],
        ppl["head_flops_per_eval"],
        peaks[fast_dtype] * 1e9,
        result["evaluation"]["round_overhead"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        result["slicing"] = bench_slicing(config, Path(tmp))
        result["pruning"] = bench_pruning(config, Path(tmp))
    result["wall_s"] = time.perf_counter() - began
    return result


def _machine() -> dict:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def format_table(result: dict) -> str:
    ev, sl, pr = result["evaluation"], result["slicing"], result["pruning"]
    rows = [
        (
            "matmul GFLOP/s fp32 / bf16",
            f"{result['matmul_gflops']['fp32']:.0f} / {result['matmul_gflops']['bf16']:.1f}",
        ),
        ("evaluation dtype", ev["fast_dtype"]),
    ]
    for name in ("perplexity", "comprehensive"):
        e = ev[name]
        ceiling = ""
        if "flop_ratio_vs_reference" in e:  # what computing less alone allows
            ceiling = f"; the reference computes {e['flop_ratio_vs_reference']:.2f}x the FLOPs"
        rows.append(
            (
                f"eval_speedup_vs_reference ({name})",
                f"{e['eval_speedup_vs_reference']:.2f}x  "
                f"({e['fast_s_per_eval']:.2f} s per sub-model{ceiling})",
            )
        )
        rows.append((f"utility_rank_corr ({name})", f"{e['utility_rank_corr']:.3f}"))
    rows.append(("gemm_utilisation (vs peak of eval dtype)", f"{result['gemm_utilisation']:.2f}"))
    for name in ("30", "50"):
        for kind, label in (
            ("decode", f"decode_speedup_at_{name}"),
            ("prefill", f"prefill speed-up at {name}%"),
        ):
            spread = sl.get(f"{kind}_speedup_spread_at_{name}")
            rows.append(
                (
                    f"{label} (batch 1 / 8)",
                    " / ".join(
                        _ratio_text(sl[f"{kind}_speedup_at_{name}"][b], (spread or {}).get(b))
                        for b in ("batch1", "batch8")
                    ),
                )
            )
        rows.append(
            (
                f"peak RSS, size on disk at {name}% (pruned/dense)",
                f"{sl[f'peak_rss_ratio_at_{name}']:.2f}, {sl[f'size_on_disk_ratio_at_{name}']:.2f}",
            )
        )
    if "bonsai_budget" in result:
        b = result["bonsai_budget"]
        rows.append(
            (
                "time to 50%, Bonsai's budget (perplexity; projected)",
                f"{b['projected_s'] / 60:.1f} min for {b['evaluations']} evaluations in "
                f"{b['rounds']} rounds, {b['projected_over_lower_bound']:.1f}x the FLOP bound "
                f"({b['flops_lower_bound_s'] / 60:.1f} min)",
            )
        )
    phases = ", ".join(f"{k} {v:.0f}" for k, v in pr["prune_phase_s"].items())
    rows.append(("prune_wall_s (U†, 50%)", f"{pr['prune_wall_s']:.0f} s  ({phases})"))
    rows.append(("prune_peak_rss_over_inference", f"{pr['prune_peak_rss_over_inference']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ratio_text(value: float, spread: dict | None) -> str:
    """'1.23x [1.18-1.30]', or the range marked as too wide to be a result."""
    if spread is None:
        return f"{value:.2f}x"
    text = f"{value:.2f}x [{spread['min']:.2f}-{spread['max']:.2f}]"
    return text if spread["trusted"] else f"{text} (spread too wide: not a result)"


def _child(argv: list[str]) -> None:
    """Entry point of the measuring child processes (their RSS is measured alone)."""
    if argv[0] == "speed":
        print(json.dumps(measure_speed(json.loads(argv[1]), int(argv[2]), argv[3])))
    elif argv[0] == "memory":
        print(json.dumps(measure_memory(argv[1], int(argv[2]), argv[3])))
    elif argv[0] == "prune":
        from bonsai_prune.api import prune
        from bonsai_prune.config import PruneConfig

        config = PruneConfig.from_dict(json.loads(argv[1]))
        report = prune(config, out_dir=argv[2], progress=False).report
        print(json.dumps({**report, "peak_rss_bytes": peak_rss_bytes()}))
    else:
        raise SystemExit(f"unknown benchmark child {argv[0]!r}")


if __name__ == "__main__":
    _child(sys.argv[1:])
