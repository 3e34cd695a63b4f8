"""Hooks on a Llama-shaped layer's two output projections: virtual masks and activation statistics.

Both sit on the *inputs* of ``o_proj`` (the concatenated head outputs, head_dim channels per
head) and ``down_proj`` (one channel per neuron), the one place where each unit's contribution
is a separate slice. Masks are arguments: the hooks read the tensor handed to them and are
removed by the adapter's context managers; nothing is stored on the modules.
"""

from __future__ import annotations

import torch

from bonsai_prune.models.adapter import HEADS, NEURONS, UnitStats
from bonsai_prune.models.attention import EmptyAttention


def mask_hook(mask: torch.Tensor, width: int):
    """Pre-hook multiplying the input (b, s, n*width) by mask (B, n), B in {1, b}."""

    def hook(module, args):
        x = args[0]
        b, s, channels = x.shape
        m = mask.to(device=x.device, dtype=x.dtype)
        if m.shape[0] not in (1, b):
            raise ValueError(f"mask has {m.shape[0]} rows for a batch of {b}")
        x = x.view(b, s, channels // width, width) * m[:, None, :, None]  # (b, s, n, width)
        return (x.view(b, s, channels),) + tuple(args[1:])

    return hook


class StatsCollector:
    """Sums |input| per channel at each masked projection; turns them into per-unit priors."""

    def __init__(self, adapter, model) -> None:  # the LlamaAdapter (or subclass) recording
        self.adapter, self.model = adapter, model
        self.abs_sum: dict[tuple[int, str], torch.Tensor] = {}
        self.n_tokens: dict[tuple[int, str], int] = {}

    def hook(self, layer: int, kind: str):
        def record(module, args):
            x = args[0].detach().float().abs()
            x = x.flatten(0, -2)  # (tokens, channels); channels may be 0 (an emptied MLP)
            key = (layer, kind)
            self.abs_sum[key] = self.abs_sum.get(key, 0) + x.sum(0).cpu()
            self.n_tokens[key] = self.n_tokens.get(key, 0) + x.shape[0]

        return record

    def result(self) -> UnitStats:
        """UnitStats over the global unit vector (wanda: mean|x| times weight-column norm)."""
        if not self.n_tokens:
            raise RuntimeError("no forward pass ran inside collect_stats()")
        adapter, wanda, weight_norm = self.adapter, [], []
        for i, layer in enumerate(adapter._layers(self.model)):
            attn, mlp = layer.self_attn, layer.mlp
            if isinstance(attn, EmptyAttention):
                wanda.append(torch.zeros(0))
                weight_norm.append(torch.zeros(0))
            else:
                hd = attn.head_dim
                o_cols = attn.o_proj.weight.float().norm(dim=0).cpu()  # (n_heads*hd,)
                mean_abs = self.abs_sum[(i, HEADS)] / self.n_tokens[(i, HEADS)]
                wanda.append((mean_abs * o_cols).view(-1, hd).sum(1))
                q_rows = adapter._q_weight(attn).float().pow(2).sum(1).cpu()  # (n_heads*hd,)
                q_rows = q_rows.view(-1, hd).sum(1)  # (n_heads,)
                weight_norm.append((q_rows + o_cols.pow(2).view(-1, hd).sum(1)).sqrt())
            down_cols = mlp.down_proj.weight.float().norm(dim=0).cpu()  # (intermediate,)
            mean_abs = self.abs_sum[(i, NEURONS)] / self.n_tokens[(i, NEURONS)]
            wanda.append(mean_abs * down_cols)
            gate_w, up_w = adapter._gate_up_weights(mlp)
            gate = gate_w.float().pow(2).sum(1).cpu()  # (intermediate,)
            up = up_w.float().pow(2).sum(1).cpu()
            weight_norm.append((gate + up + down_cols.pow(2)).sqrt())
        return UnitStats(wanda=torch.cat(wanda), weight_norm=torch.cat(weight_norm))
