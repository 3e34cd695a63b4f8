"""Adapter for Phi-3 (and Phi-3.5): fused ``qkv_proj`` and ``gate_up_proj``.

``qkv_proj`` stacks the rows [q heads | k heads | v heads]; ``gate_up_proj`` stacks [gate | up]
and its forward splits them with ``chunk(2)``. Slicing keeps the right rows of each part, in
the same order, so the fused layout survives. Phi3Attention splits q from k/v with
``config.num_attention_heads`` and ``self.num_key_value_heads``, which are model-wide; a sliced
layer gets its own counts through :class:`LayerConfig`, a view of the model config that
overrides the head count and reads everything else (the attention implementation included)
from the shared config, so later ``set_attn_implementation`` calls still reach it.
"""

from __future__ import annotations

import torch

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.attention import EmptyAttention
from bonsai_prune.models.llama import LlamaAdapter, empty_linear, slice_linear


class LayerConfig:
    """The model config as one layer sees it: ``overrides`` first, the shared config after."""

    def __init__(self, base, **overrides) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)  # copy/pickle probe dunders before __init__ ran
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._base, name, value)  # the shared config stays the one source of truth


@ADAPTERS.register("phi3")
class Phi3Adapter(LlamaAdapter):
    """Units and surgery for ``Phi3ForCausalLM``: the Llama logic over fused projections."""

    lean_decoding = "Phi-3's fused projections and partial rotary are not in the lean decoder"

    def _n_kv_heads(self, attn) -> int:
        if isinstance(attn, EmptyAttention):
            return 0
        q_rows = attn.o_proj.in_features
        return (attn.qkv_proj.out_features - q_rows) // (2 * attn.head_dim)

    def _qkv_bias(self, attn) -> bool:
        return attn.qkv_proj.bias is not None

    def _q_weight(self, attn) -> torch.Tensor:
        return attn.qkv_proj.weight[: attn.o_proj.in_features]

    def _qkv_projections(self) -> tuple[str, ...]:
        return ("qkv_proj",)

    def _slice_qkv(self, attn, q_channels: torch.Tensor, kv_channels: torch.Tensor) -> None:
        q_rows = attn.o_proj.in_features
        kv_rows = (attn.qkv_proj.out_features - q_rows) // 2
        rows = torch.cat([q_channels, q_rows + kv_channels, q_rows + kv_rows + kv_channels])
        attn.qkv_proj = slice_linear(attn.qkv_proj, rows=rows)  # [q | k | v] kept, in order

    def _empty_qkv(self, attn, hidden: int, n_q: int, n_kv: int) -> None:
        rows = (n_q + 2 * n_kv) * attn.head_dim
        attn.qkv_proj = empty_linear(hidden, rows, self._qkv_bias(attn))

    def _after_attention_resized(self, model, attn) -> None:
        n_q = attn.o_proj.in_features // attn.head_dim
        attn.config = LayerConfig(model.config, num_attention_heads=n_q)
        attn.num_key_value_heads = self._n_kv_heads(attn)

    def _gate_up_bias(self, mlp) -> bool:
        return mlp.gate_up_proj.bias is not None

    def _gate_up_weights(self, mlp) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up

    def _slice_gate_up(self, mlp, kept: torch.Tensor) -> None:
        n = mlp.gate_up_proj.out_features // 2
        mlp.gate_up_proj = slice_linear(mlp.gate_up_proj, rows=torch.cat([kept, n + kept]))

    def _empty_gate_up(self, mlp, hidden: int, n_neurons: int) -> None:
        mlp.gate_up_proj = empty_linear(hidden, 2 * n_neurons, self._gate_up_bias(mlp))
