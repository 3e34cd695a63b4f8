"""Adapter for the Llama family (Llama 2/3, SmolLM2): where heads and neurons live.

Grouped-query attention. A unit is one *query* head. Query heads are pruned one by one; the
K/V head a group shares goes only when every query head of its group has gone. Once a layer
is sliced its groups may be uneven (say 3, 1 and 2 query heads over 3 K/V heads), which the
stock HF attention (``repeat_kv`` by a single group size) cannot express, so each sliced
attention module carries ``kv_head_index`` (its query head -> K/V head map) and the model runs
the ``bonsai_sdpa`` attention function: SDPA after gathering K/V by that map. The cost of a
head is its q rows and o columns plus an equal share of its group's K/V rows, so removing a
whole group frees exactly the K/V parameters; the parameter count after slicing is exact.

A layer may lose every query head (FinerCut removes whole attention sub-layers, and Bonsai can
when the user allows empty modules): slicing then puts an :class:`EmptyAttention` in place of
``self_attn``, which adds nothing to the residual stream (exactly what the fully masked module
adds) and owns no weights but the o_proj bias, if the model has one. The layer's
``input_layernorm`` stays, unused: it keeps state-dict names stable and costs ``hidden``
parameters, which stay counted.

Masking (virtual sub-models) needs no weight change: a forward pre-hook on ``o_proj`` scales
each head's slice of the concatenated head outputs, one on ``down_proj`` scales each neuron.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from bonsai_prune.core.selection import SharedCosts
from bonsai_prune.models.adapter import ADAPTERS, HEADS, NEURONS, UnitLayout

ATTENTION_IMPLEMENTATION = "bonsai_sdpa"


def _kv_mapped_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA where each query head reads the K/V head named by ``module.kv_head_index``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    index = getattr(module, "kv_head_index", None)
    if index is not None:
        key = key.index_select(1, index)  # (b, n_query_heads, s, head_dim)
        value = value.index_select(1, index)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _kv_mapped_sdpa)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)


def use_kv_mapped_attention(model) -> None:
    """Switch ``model`` to the attention function that understands uneven GQA groups."""
    _register_attention()
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def _slice_linear(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding only ``rows`` (outputs) and ``cols`` (inputs) of ``linear``."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        rows = rows.to(weight.device)  # index_select wants the index where the weight is
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new


def _empty_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """A shape-only Linear on the meta device, filled later by ``load_state_dict(assign=True)``."""
    return nn.Linear(n_in, n_out, bias=bias, device="meta")


def _empty_attention_like(attn) -> EmptyAttention:
    """The EmptyAttention that replaces ``attn`` once its last query head is removed."""
    bias = attn.o_proj.bias
    return EmptyAttention(
        attn.layer_idx, attn.head_dim, None if bias is None else bias.detach().clone()
    )


def _channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices (n*width,) of the given head indices (n,)."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


class EmptyAttention(nn.Module):
    """Stands in for an attention sub-layer whose query heads have all been removed.

    Its output is zero (plus the o_proj bias, if the model had one), exactly what the fully
    masked attention gives. It still writes to the KV cache: transformers reads the cached
    sequence length from layer 0 (``get_seq_length()``) to place new tokens, and a zero-head
    (b, 0, s, head_dim) tensor would not count (``DynamicLayer.get_seq_length`` returns 0 for
    a cache with no elements), so the layer caches a (b, 1, s, 1) zero placeholder instead:
    one number per token.
    """

    def __init__(self, layer_idx: int, head_dim: int, o_bias: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim
        self.o_bias = None if o_bias is None else nn.Parameter(o_bias, requires_grad=False)

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        past_key_values=None,
        **kwargs,
    ):
        b, s, _ = hidden_states.shape
        # transformers 5.2x passes the cache as ``cache``; earlier releases as ``past_key_values``
        past_key_values = kwargs.get("cache", past_key_values)
        if past_key_values is not None:
            placeholder = hidden_states.new_zeros(b, 1, s, 1)  # (b, 1 "head", s, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        out = torch.zeros_like(hidden_states)  # (b, s, hidden)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


@ADAPTERS.register("llama")
class LlamaAdapter:
    """Units and surgery for ``LlamaForCausalLM``-shaped models."""

    def _layers(self, model):
        return model.model.layers

    def _head_dim(self, attn) -> int:
        return attn.head_dim

    def _n_heads(self, attn) -> int:
        if isinstance(attn, EmptyAttention):
            return 0
        return attn.q_proj.out_features // attn.head_dim

    def _n_kv_heads(self, attn) -> int:
        if isinstance(attn, EmptyAttention):
            return 0
        return attn.k_proj.out_features // attn.head_dim

    def _kv_index(self, attn) -> torch.Tensor:
        """LongTensor (n_query_heads,): which K/V head each query head reads."""
        if isinstance(attn, EmptyAttention):
            return torch.zeros(0, dtype=torch.long)
        index = getattr(attn, "kv_head_index", None)
        if index is not None:
            return index.cpu()
        return torch.arange(self._n_heads(attn)) // attn.num_key_value_groups

    # ---- units and costs ------------------------------------------------------------------

    def layout(self, model) -> UnitLayout:
        sizes = []
        for i, layer in enumerate(self._layers(model)):
            sizes.append((i, HEADS, self._n_heads(layer.self_attn)))
            sizes.append((i, NEURONS, layer.mlp.down_proj.in_features))
        return UnitLayout.from_sizes(sizes)

    def min_units(self, kind: str, allow_empty: bool = False) -> int:
        # An emptied attention layer becomes an EmptyAttention, which changes the module
        # type, so it happens only when the caller asks for it; an empty MLP is plain shapes.
        return 1 if kind == HEADS and not allow_empty else 0

    def unit_costs(self, model) -> torch.Tensor:
        costs = []
        for layer in self._layers(model):
            mlp = layer.mlp
            hidden = mlp.down_proj.out_features
            costs.append(self._head_costs(layer.self_attn, hidden))
            gate_up_bias = 2 if mlp.gate_proj.bias is not None else 0
            neuron = 3 * hidden + gate_up_bias
            costs.append(
                torch.full((mlp.down_proj.in_features,), float(neuron), dtype=torch.float64)
            )
        return torch.cat(costs)

    def _head_costs(self, attn, hidden: int) -> torch.Tensor:
        """FloatTensor (n_heads,): q rows, o columns and an equal share of the group's K/V."""
        if isinstance(attn, EmptyAttention):
            return torch.zeros(0, dtype=torch.float64)
        hd = attn.head_dim
        kv_index = self._kv_index(attn)
        group_size = torch.bincount(kv_index)[kv_index].double()  # (n_heads,)
        q_bias = hd if attn.q_proj.bias is not None else 0
        kv_share = 2 * (hd * hidden + (hd if attn.k_proj.bias is not None else 0))
        return 2 * hd * hidden + q_bias + kv_share / group_size

    def shared_costs(self, model) -> tuple[torch.Tensor, SharedCosts]:
        """(own costs (U,), SharedCosts): each head's q rows and o columns alone, and each K/V
        head as a group freed with its last query head; neurons share nothing. Selection with
        these frees exactly what it counts (``unit_costs`` spreads K/V evenly instead)."""
        own, groups, group_costs = [], [], []
        for layer in self._layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            hidden = mlp.down_proj.out_features
            if not isinstance(attn, EmptyAttention):
                hd = attn.head_dim
                kv_index = self._kv_index(attn).cpu()
                q_bias = hd if attn.q_proj.bias is not None else 0
                own.append(torch.full((kv_index.numel(),), float(2 * hd * hidden + q_bias)))
                groups.append(kv_index + len(group_costs))
                kv_bias = hd if attn.k_proj.bias is not None else 0
                group_costs += [float(2 * (hd * hidden + kv_bias))] * int(kv_index.max() + 1)
            gate_up_bias = 2 if mlp.gate_proj.bias is not None else 0
            n_neurons = mlp.down_proj.in_features
            own.append(torch.full((n_neurons,), float(3 * hidden + gate_up_bias)))
            groups.append(torch.full((n_neurons,), -1, dtype=torch.long))
        shared = SharedCosts(
            torch.cat(groups).long(), torch.tensor(group_costs, dtype=torch.float64)
        )
        return torch.cat(own).double(), shared

    def count_parameters(self, model) -> int:
        scope = list(self._layers(model)) + [model.model.norm]
        return sum(p.numel() for module in scope for p in module.parameters())

    # ---- virtual masking and statistics ---------------------------------------------------

    @contextmanager
    def apply_masks(self, model, keep: torch.Tensor):
        """Scale head outputs and neuron activations by ``keep`` (U,) or (B, U) inside the block."""
        layout = self.layout(model)
        keep = keep if keep.dim() == 2 else keep[None]  # (B, U)
        # one host-to-device copy here, not one per hook call and decode step
        keep = keep.to(next(model.parameters()).device)
        handles = []
        try:
            for module, mask in layout.split(keep):
                if bool(mask.all()):
                    continue  # nothing removed here: no hook, no cost
                layer = self._layers(model)[module.layer]
                if module.kind == HEADS:
                    target, width = layer.self_attn.o_proj, layer.self_attn.head_dim
                else:
                    target, width = layer.mlp.down_proj, 1
                handles.append(target.register_forward_pre_hook(_mask_hook(mask, width)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def collect_stats(self, model):
        """Accumulate mean |input| per channel of every o_proj and down_proj."""
        collector = _StatsCollector(self, model)
        handles = []
        try:
            for i, layer in enumerate(self._layers(model)):
                if not isinstance(layer.self_attn, EmptyAttention):
                    o_proj = layer.self_attn.o_proj
                    handles.append(o_proj.register_forward_pre_hook(collector.hook(i, HEADS)))
                handles.append(
                    layer.mlp.down_proj.register_forward_pre_hook(collector.hook(i, NEURONS))
                )
            yield collector
        finally:
            for handle in handles:
                handle.remove()

    # ---- physical surgery -----------------------------------------------------------------

    @torch.no_grad()
    def slice(self, model, keep: torch.Tensor) -> None:
        layout = self.layout(model)
        keep = keep.cpu().bool()
        for module, mask in layout.split(keep):
            layer = self._layers(model)[module.layer]
            kept = torch.nonzero(mask).flatten()
            if module.kind == HEADS:
                if len(kept) == 0 < module.n_units:
                    layer.self_attn = _empty_attention_like(layer.self_attn)
                elif len(kept) < module.n_units:
                    self._slice_heads(layer.self_attn, kept)
            elif len(kept) < module.n_units:
                mlp = layer.mlp
                mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=kept)
                mlp.up_proj = _slice_linear(mlp.up_proj, rows=kept)
                mlp.down_proj = _slice_linear(mlp.down_proj, cols=kept)
        use_kv_mapped_attention(model)

    def _slice_heads(self, attn, kept: torch.Tensor) -> None:
        hd = attn.head_dim
        kv_index = self._kv_index(attn)[kept]  # (n_kept,) old K/V ids
        kv_kept, new_index = torch.unique(kv_index, sorted=True, return_inverse=True)
        q_channels, kv_channels = _channels(kept, hd), _channels(kv_kept, hd)
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_channels)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_channels)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_channels)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_channels)
        self._set_kv_index(attn, new_index)

    def _set_kv_index(self, attn, index: torch.Tensor, device=None) -> None:
        # Structure, not a mask: it lives with the module like its weight shapes do.
        device = device or attn.q_proj.weight.device
        attn.register_buffer("kv_head_index", index.to(device), persistent=False)
        attn.num_key_value_groups = 1  # K/V are gathered per query head by kv_head_index

    def structure(self, model) -> dict:
        layers = []
        for layer in self._layers(model):
            attn = layer.self_attn
            layers.append(
                {
                    "query_heads": self._n_heads(attn),
                    "kv_heads": self._n_kv_heads(attn),
                    "kv_head_index": self._kv_index(attn).tolist(),
                    "intermediate_size": layer.mlp.down_proj.in_features,
                }
            )
        return {"family": "llama", "layers": layers}

    def restructure(self, model, structure: dict) -> None:
        layers = structure["layers"]
        for layer, sizes in zip(self._layers(model), layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            hidden, hd = attn.o_proj.out_features, attn.head_dim
            nq, nkv, inter = sizes["query_heads"], sizes["kv_heads"], sizes["intermediate_size"]
            if nq == 0:
                o_bias = (
                    torch.empty(hidden, device="meta") if attn.o_proj.bias is not None else None
                )
                layer.self_attn = EmptyAttention(attn.layer_idx, hd, o_bias)
            else:
                qkv_bias = attn.q_proj.bias is not None
                attn.q_proj = _empty_linear(hidden, nq * hd, qkv_bias)
                attn.k_proj = _empty_linear(hidden, nkv * hd, qkv_bias)
                attn.v_proj = _empty_linear(hidden, nkv * hd, qkv_bias)
                attn.o_proj = _empty_linear(nq * hd, hidden, attn.o_proj.bias is not None)
                index = torch.tensor(sizes["kv_head_index"], dtype=torch.long)
                self._set_kv_index(attn, index, device=layer.input_layernorm.weight.device)
            mlp_bias = mlp.down_proj.bias is not None
            mlp.gate_proj = _empty_linear(hidden, inter, mlp_bias)
            mlp.up_proj = _empty_linear(hidden, inter, mlp_bias)
            mlp.down_proj = _empty_linear(inter, hidden, mlp_bias)
        use_kv_mapped_attention(model)


def _mask_hook(mask: torch.Tensor, width: int):
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


class _StatsCollector:
    """Sums |input| per channel at each masked projection; turns them into per-unit priors."""

    def __init__(self, adapter: LlamaAdapter, model) -> None:
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

    def result(self):
        """UnitStats over the global unit vector (wanda: mean|x| times weight-column norm)."""
        from bonsai_prune.core.priors import UnitStats

        if not self.n_tokens:
            raise RuntimeError("no forward pass ran inside collect_stats()")
        wanda, weight_norm = [], []
        for i, layer in enumerate(self.adapter._layers(self.model)):
            attn, mlp = layer.self_attn, layer.mlp
            hd = attn.head_dim
            if isinstance(attn, EmptyAttention):
                wanda.append(torch.zeros(0))
                weight_norm.append(torch.zeros(0))
            else:
                o_cols = attn.o_proj.weight.float().norm(dim=0).cpu()  # (n_heads*hd,)
                mean_abs = self.abs_sum[(i, HEADS)] / self.n_tokens[(i, HEADS)]
                wanda.append((mean_abs * o_cols).view(-1, hd).sum(1))
                q_rows = attn.q_proj.weight.float().pow(2).sum(1).cpu().view(-1, hd).sum(1)
                weight_norm.append((q_rows + o_cols.pow(2).view(-1, hd).sum(1)).sqrt())
            down_cols = mlp.down_proj.weight.float().norm(dim=0).cpu()  # (intermediate,)
            mean_abs = self.abs_sum[(i, NEURONS)] / self.n_tokens[(i, NEURONS)]
            wanda.append(mean_abs * down_cols)
            gate = mlp.gate_proj.weight.float().pow(2).sum(1).cpu()
            up = mlp.up_proj.weight.float().pow(2).sum(1).cpu()
            weight_norm.append((gate + up + down_cols.pow(2)).sqrt())
        return UnitStats(wanda=torch.cat(wanda), weight_norm=torch.cat(weight_norm))
