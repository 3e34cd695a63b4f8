"""Batch-1 decode in llama.cpp: pruned models against their dense parent, with the ceilings.

    python scripts/llamacpp_ab.py [RUN_OR_MODEL_DIR ...] [--random-slice 0.5 ...]
        [--dense default] [--dtype f16] [--mlp-multiple N] [--quantize Q4_K_M]
        [--rounds 5] [--tokens 64] [--threads 2] [--out FILE.json]

Exports the dense model and every pruned one to GGUF (`deci`, the same writer for all), times
them in alternating rounds (`export.llamacpp_speed.compare_decode_speed`) and prints per model
the median ms per token, the speed-up over dense (median [min-max] of the per-round ratios),
and two ceilings: the ratio of the weights the model itself reads per token (its parameters,
the tied head included) and the ratio of the GGUF's tensor bytes (the equal-group rewrite may
pad uneven K/V groups with zero heads). ``--random-slice F`` adds the dense model cut at random
units to sparsity F, as `bonsai-prune bench` does (speed depends only on the shapes). Run it on
an otherwise idle machine. ``--quantize TYPE`` quantises every exported file with llama.cpp's own
quantiser (as llama-quantize does) before timing; ``--mlp-multiple N`` pads MLP widths (exact).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bonsai_prune.bench.slicing import slice_at_random
from bonsai_prune.export.gguf_writer import export_gguf
from bonsai_prune.export.llamacpp_speed import compare_decode_speed, quantize
from bonsai_prune.models import adapter_for, load_model
from bonsai_prune.models.loading import dequantised_default
from bonsai_prune.models.pruned import save_model


def decode_params(spec: str) -> int:
    """Parameters a decode step reads: all of them, the embedding only where it is the head."""
    model, _ = load_model(spec, dtype="fp32")
    total = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel()  # one row read per token
    return total


def random_slice(dense: str, sparsity: float, out: Path) -> Path:
    """The dense model cut at random units to ``sparsity``, saved as a pruned model folder."""
    model, tokenizer = load_model(dense, dtype="fp32")
    adapter = adapter_for(model)
    slice_at_random(model, adapter, sparsity, seed=0)
    return save_model(out, model, tokenizer, adapter.structure(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pruned", nargs="*", help="run directories or model folders")
    parser.add_argument(
        "--random-slice",
        type=float,
        action="append",
        default=[],
        metavar="SPARSITY",
        help="also time the dense model cut at random units to this sparsity (repeatable)",
    )
    parser.add_argument("--dense", default="default", help="the dense parent (default: packaged)")
    parser.add_argument("--dtype", default="f16", choices=("f16", "q8_0"))
    parser.add_argument("--mlp-multiple", type=int, default=None, help="export_gguf's padding")
    parser.add_argument("--quantize", default=None, metavar="TYPE", help="e.g. Q4_K_M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the measurements as JSON")
    args = parser.parse_args()

    if not args.pruned and not args.random_slice:
        parser.error("give a pruned model folder or --random-slice SPARSITY")
    dense_dir = dequantised_default() if args.dense == "default" else Path(args.dense)
    specs = {"dense": str(dense_dir)} | {str(p): str(p) for p in args.pruned}
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in args.random_slice:
            folder = random_slice(str(dense_dir), sparsity, Path(tmp) / f"random-{sparsity}")
            specs[f"random {sparsity:.0%} slice"] = str(folder)
        paths = {
            name: export_gguf(
                spec, Path(tmp) / f"m{i}.gguf", dtype=args.dtype, mlp_multiple=args.mlp_multiple
            )
            for i, (name, spec) in enumerate(specs.items())
        }
        if args.quantize:
            paths = {
                name: quantize(path, path.with_suffix(f".{args.quantize}.gguf"), args.quantize)
                for name, path in paths.items()
            }
        result = compare_decode_speed(paths, args.tokens, args.rounds, args.threads)
        params = {name: decode_params(spec) for name, spec in specs.items()}
    padding = f"MLP widths padded to a multiple of {args.mlp_multiple or 'the default'}"
    print(
        f"llama.cpp {args.quantize or args.dtype} ({padding}), batch 1, {args.tokens} tokens, "
        f"{args.threads} threads, {args.rounds} alternated rounds"
    )
    print(
        "model | MB read per token | ms/token | speed-up [min-max] | ceiling (params) | "
        "ceiling (GGUF bytes) | of ceiling (params)"
    )
    for name in specs:
        ms = statistics.median(result.ms_per_token[name])
        mb = result.weight_bytes[name] / 1e6
        if name == result.baseline:
            print(f"{name} | {mb:.1f} | {ms:.2f} | 1 | 1 | 1 | ")
            continue
        ratios = sorted(result.speedup[name])
        own = params["dense"] / params[name]
        print(
            f"{name} | {mb:.1f} | {ms:.2f} | {statistics.median(ratios):.2f}x [{ratios[0]:.2f}-"
            f"{ratios[-1]:.2f}] | {own:.2f}x | {result.ceiling[name]:.2f}x | "
            f"{statistics.median(ratios) / own:.2f}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = result.to_dict() | {
            "decode_params": params,
            "dtype": args.dtype,
            "quantize": args.quantize,
            "mlp_multiple": args.mlp_multiple,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
