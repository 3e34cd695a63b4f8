"""What slicing buys: decode and prefill speed, memory and size on disk of randomly sliced
models against the dense one, and a real pruning run's time and memory against inference;
each measured in a child process of its own."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bonsai_prune.bench.config import BenchConfig
from bonsai_prune.bench.measure import ratio_over_rounds, run_child, timed
from bonsai_prune.memory import peak_resident_bytes


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


def bench_prompts(tokenizer, n: int = 8) -> list[str]:
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
        _, prefill_s = timed(lambda: model(**inputs, logits_to_keep=1))
        # decode = generating n tokens minus generating 1 (the same prefill and set-up): not
        # minus a plain forward, whose time differs from generation's own prefill
        _, first_s = timed(lambda: greedy_sequences(model, ids, mask, 1, pad_token_id=pad))
        _, total_s = timed(
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
    prompts = bench_prompts(next(iter(loaded.values()))[1])
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


def measure_memory(model_dir: str, decode_tokens: int, dtype: str = "auto") -> dict:
    """In a child process: load one model and generate, then report this process's own peak."""
    from bonsai_prune.models import load_model

    model, tokenizer = load_model(model_dir, dtype=dtype)
    _speed_once(model, tokenizer, bench_prompts(tokenizer), 8, decode_tokens)
    return {"peak_rss_bytes": peak_resident_bytes()}


def dir_bytes(path: Path) -> int:
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
        measured[name] = {**speed[name], **memory, "size_on_disk_bytes": dir_bytes(folder)}
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
