"""Prototype, measured before it becomes a library option: least-squares compensation of the
output projections before each slice (issue 18, item 7).

When a round removes heads or neurons, the rows of ``o_proj`` / ``down_proj`` that read them
are dropped and their contribution to the residual stream is lost. Forward passes give, for
each projection, the Gram matrix G = X^T X of its input channels on calibration text; the kept
columns W_K can then absorb what the removed ones W_R wrote, in the least-squares sense:
``W_K += ((G_KK + lambda I)^-1 G_KR W_R^T)^T`` (ridge, lambda = damping x mean diag G_KK). No
gradient, a few seconds per round (the math: ``core.compensation.refit_kept_columns``). This
script patches ``LlamaAdapter.slice`` to do it, runs a
Bonsai+perplexity prune, and leaves the run for ``scripts/heldout_ppl.py``:

    python scripts/compensation_study.py runs/i18/comp20 --sparsity 0.2
    python scripts/heldout_ppl.py runs/i18/comp20 --limit 96
"""

from __future__ import annotations

import argparse
import time

import torch

from bonsai_prune.api import prune
from bonsai_prune.config import PruneConfig
from bonsai_prune.core.compensation import refit_kept_columns
from bonsai_prune.data.calibration import build_batch
from bonsai_prune.data.problems import load_gsm8k
from bonsai_prune.models import load_model
from bonsai_prune.models.adapter import HEADS
from bonsai_prune.models.llama import LlamaAdapter


@torch.no_grad()
def input_grams(adapter, model, batch) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, kind) -> X^T X (float64) of the inputs of o_proj / down_proj, unpadded rows."""
    grams: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key):
        def add(module, args):
            x = args[0].detach().double().flatten(0, -2)  # (tokens, channels)
            grams[key] = grams.get(key, 0) + x.T @ x

        return add

    handles = []
    for i, layer in enumerate(adapter._layers(model)):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook((i, HEADS))))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook((i, "neurons"))))
    try:
        for row in range(batch.input_ids.shape[0]):
            length = int(batch.attention_mask[row].sum())
            model.get_decoder()(input_ids=batch.input_ids[row : row + 1, :length])
    finally:
        for handle in handles:
            handle.remove()
    return grams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--prune-fraction", type=float, default=0.1)
    parser.add_argument("--calibration", type=int, default=16, help="GSM8K train problems")
    parser.add_argument("--damping", type=float, default=0.01)
    args = parser.parse_args()
    model, tokenizer = load_model("default", dtype="auto")
    batch = build_batch(tokenizer, load_gsm8k("train")[-args.calibration :])
    slice_units = LlamaAdapter.slice

    @torch.no_grad()
    def slice_compensated(adapter, model, keep):
        began, layers = time.perf_counter(), adapter._layers(model)
        grams = input_grams(adapter, model, batch)
        for module, mask in adapter.layout(model).split(keep.bool()[None]):
            mask = mask[0]
            if bool(mask.all()) or not bool(mask.any()):
                continue
            layer = layers[module.layer]
            target, width = (
                (layer.self_attn.o_proj, layer.self_attn.head_dim)
                if module.kind == HEADS
                else (layer.mlp.down_proj, 1)
            )
            kept = mask.repeat_interleave(width)
            gram = grams[(module.layer, module.kind)]
            target.weight.copy_(refit_kept_columns(target.weight, gram, kept, args.damping))
        print(f"compensated in {time.perf_counter() - began:.1f} s", flush=True)
        return slice_units(adapter, model, keep)

    LlamaAdapter.slice = slice_compensated
    config = PruneConfig(
        method="bonsai",
        sparsity=args.sparsity,
        prune_fraction=args.prune_fraction,
        utility={"name": "perplexity"},
    )
    prune(config, model=model, tokenizer=tokenizer, out_dir=args.out, progress=False)


if __name__ == "__main__":
    main()
