"""Adapter for the Llama family (Llama 2/3, SmolLM2), and the base of every Llama-shaped family.

Grouped-query attention. A unit is one *query* head. Query heads are pruned one by one; the
K/V head a group shares goes only when every query head of its group has gone. Sliced layers
may have uneven groups, so they run the K/V-gathering attention of :mod:`.attention`. The
cost of a head is its q rows and o columns plus an equal share of its group's K/V rows (and of
the layer's per-head-dim norms, if any), so removing a whole group frees exactly the K/V
parameters; the parameter count after slicing is exact.

A layer may lose every query head (FinerCut removes whole attention sub-layers, and Bonsai can
when the user allows empty modules): slicing then puts an :class:`EmptyAttention` in place of
``self_attn``. The layer's ``input_layernorm`` stays, unused: it keeps state-dict names stable
and costs ``hidden`` parameters, which stay counted.

Masking (virtual sub-models) needs no weight change: a forward pre-hook on ``o_proj`` scales
each head's slice of the concatenated head outputs, one on ``down_proj`` scales each neuron.

:class:`LlamaAdapter` is written once for every decoder whose layers hold ``self_attn`` (with
an ``o_proj``) and ``mlp`` (with a ``down_proj``). A family subclasses it and overrides only
what differs: where the q/k/v and gate/up rows live (``_qkv_*``, ``_gate_up_*``: Phi-3 fuses
them) and which exact attention path it needs (``attention_kind``: Gemma 2 soft-caps). Biases,
per-head-dim norms and a head_dim that is not hidden / heads are handled here.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from bonsai_prune.core.selection import SharedCosts
from bonsai_prune.models.adapter import ADAPTERS, HEADS, NEURONS, UnitLayout
from bonsai_prune.models.attention import (
    SDPA,
    EmptyAttention,
    set_kv_head_index,
    use_kv_mapped_attention,
)
from bonsai_prune.models.masking import StatsCollector, mask_hook

__all__ = ["EmptyAttention", "LlamaAdapter", "slice_linear", "empty_linear", "head_channels"]


def slice_linear(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding only ``rows`` (outputs) and ``cols`` (inputs) of ``linear``."""
    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        rows = rows.to(weight.device)  # index_select wants the index where the weight is
        weight = weight.index_select(0, rows)
        bias = bias.index_select(0, rows) if bias is not None else None
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    new = empty_linear(weight.shape[1], weight.shape[0], bias is not None)
    new.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return new


def empty_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """A shape-only Linear on the meta device, filled later (``load_state_dict(assign=True)``,
    or its parameters set). A 0-wide one (an emptied MLP) would make torch warn the user that
    initialising it is a no-op: nothing reads those weights, so the warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
        return nn.Linear(n_in, n_out, bias=bias, device="meta")


def head_channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices (n*width,) of the given head indices (n,)."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def _empty_attention_like(attn) -> EmptyAttention:
    """The EmptyAttention that replaces ``attn`` once its last query head is removed."""
    bias = attn.o_proj.bias
    return EmptyAttention(
        attn.layer_idx, attn.head_dim, None if bias is None else bias.detach().clone()
    )


@ADAPTERS.register("llama")
class LlamaAdapter:
    """Units and surgery for ``LlamaForCausalLM``-shaped models."""

    # ---- where the weights live: what a family with another layout overrides -------------

    def _layers(self, model):
        return model.model.layers

    def _final_norm(self, model) -> nn.Module:
        return model.model.norm

    def _n_kv_heads(self, attn) -> int:
        if isinstance(attn, EmptyAttention):
            return 0
        return attn.k_proj.out_features // attn.head_dim

    def _qkv_bias(self, attn) -> bool:
        """Whether the q/k/v projections carry biases (they go with their rows)."""
        return attn.q_proj.bias is not None

    def _q_weight(self, attn) -> torch.Tensor:
        """(n_heads*head_dim, hidden): the query rows."""
        return attn.q_proj.weight

    def _qkv_projections(self) -> tuple[str, ...]:
        """Names of the modules holding q/k/v rows (their parameters are per-head, not shared)."""
        return ("q_proj", "k_proj", "v_proj")

    def _slice_qkv(self, attn, q_channels: torch.Tensor, kv_channels: torch.Tensor) -> None:
        attn.q_proj = slice_linear(attn.q_proj, rows=q_channels)
        attn.k_proj = slice_linear(attn.k_proj, rows=kv_channels)
        attn.v_proj = slice_linear(attn.v_proj, rows=kv_channels)

    def _empty_qkv(self, attn, hidden: int, n_q: int, n_kv: int) -> None:
        hd, bias = attn.head_dim, self._qkv_bias(attn)
        attn.q_proj = empty_linear(hidden, n_q * hd, bias)
        attn.k_proj = empty_linear(hidden, n_kv * hd, bias)
        attn.v_proj = empty_linear(hidden, n_kv * hd, bias)

    def _gate_up_bias(self, mlp) -> bool:
        return mlp.gate_proj.bias is not None

    def _gate_up_weights(self, mlp) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up rows, each (intermediate, hidden)."""
        return mlp.gate_proj.weight, mlp.up_proj.weight

    def _slice_gate_up(self, mlp, kept: torch.Tensor) -> None:
        mlp.gate_proj = slice_linear(mlp.gate_proj, rows=kept)
        mlp.up_proj = slice_linear(mlp.up_proj, rows=kept)

    def _empty_gate_up(self, mlp, hidden: int, n_neurons: int) -> None:
        bias = self._gate_up_bias(mlp)
        mlp.gate_proj = empty_linear(hidden, n_neurons, bias)
        mlp.up_proj = empty_linear(hidden, n_neurons, bias)

    def _after_attention_resized(self, model, attn) -> None:
        """Tell the module its new head counts where its forward reads them (Phi-3 does)."""

    # ---- lean decoding (models/decoding.py) -----------------------------------------------

    # None: the lean decoder runs this family; else why transformers' generate decodes it
    lean_decoding: str | None = None

    def decode_window(self, model, attn) -> int | None:
        """How many cache slots a query at the newest slot may read in this layer (None: all)."""
        return getattr(attn, "sliding_window", None)

    def attention_kind(self, model) -> str:
        """Which K/V-gathering attention sliced layers run: sdpa, or eager where the family's
        attention does what SDPA cannot (Gemma 2's soft-capping)."""
        return SDPA

    # ---- derived sizes --------------------------------------------------------------------

    def _n_heads(self, attn) -> int:
        if isinstance(attn, EmptyAttention):
            return 0
        return attn.o_proj.in_features // attn.head_dim

    def _kv_index(self, attn) -> torch.Tensor:
        """LongTensor (n_query_heads,): which K/V head each query head reads."""
        if isinstance(attn, EmptyAttention):
            return torch.zeros(0, dtype=torch.long)
        index = getattr(attn, "kv_head_index", None)
        if index is not None:
            return index.cpu()
        return torch.arange(self._n_heads(attn)) // attn.num_key_value_groups

    def _shared_head_parameters(self, attn) -> int:
        """Parameters every head of the layer shares and that go with the last one: per-head-dim
        norms (Qwen3, Gemma 3 ``q_norm``/``k_norm``). Not the o_proj bias, which stays."""
        own = {*self._qkv_projections(), "o_proj"}
        return sum(
            p.numel()
            for name, child in attn.named_children()
            if name not in own
            for p in child.parameters()
        )

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
            gate_up_bias = 2 if self._gate_up_bias(mlp) else 0
            neuron = 3 * hidden + gate_up_bias
            costs.append(
                torch.full((mlp.down_proj.in_features,), float(neuron), dtype=torch.float64)
            )
        return torch.cat(costs)

    def _head_costs(self, attn, hidden: int) -> torch.Tensor:
        """FloatTensor (n_heads,): q rows, o columns, an equal share of the group's K/V and of
        the layer's shared per-head-dim norms."""
        if isinstance(attn, EmptyAttention):
            return torch.zeros(0, dtype=torch.float64)
        hd, bias = attn.head_dim, self._qkv_bias(attn)
        kv_index = self._kv_index(attn)
        group_size = torch.bincount(kv_index)[kv_index].double()  # (n_heads,)
        q_bias = hd if bias else 0
        kv_share = 2 * (hd * hidden + (hd if bias else 0))
        shared = self._shared_head_parameters(attn) / len(kv_index)
        return 2 * hd * hidden + q_bias + kv_share / group_size + shared

    def shared_costs(self, model) -> tuple[torch.Tensor, SharedCosts]:
        """(own costs (U,), SharedCosts): each head's q rows and o columns alone, and each K/V
        head as a group freed with its last query head; neurons share nothing. Selection with
        these frees exactly what it counts (``unit_costs`` spreads K/V evenly instead). The
        layer's per-head-dim norms (Qwen3, Gemma 3) go only with its very last head, which
        happens only with ``allow_empty``; they are not charged, so selection then frees a
        few parameters more than it counted, never fewer."""
        own, groups, group_costs = [], [], []
        for layer in self._layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            hidden = mlp.down_proj.out_features
            if not isinstance(attn, EmptyAttention):
                hd, bias = attn.head_dim, self._qkv_bias(attn)
                kv_index = self._kv_index(attn)
                own.append(
                    torch.full((kv_index.numel(),), float(2 * hd * hidden + (hd if bias else 0)))
                )
                groups.append(kv_index + len(group_costs))
                group_costs += [float(2 * (hd * hidden + (hd if bias else 0)))] * int(
                    kv_index.max() + 1
                )
            n_neurons = mlp.down_proj.in_features
            neuron = 3 * hidden + (2 if self._gate_up_bias(mlp) else 0)
            own.append(torch.full((n_neurons,), float(neuron)))
            groups.append(torch.full((n_neurons,), -1, dtype=torch.long))
        shared = SharedCosts(
            torch.cat(groups).long(), torch.tensor(group_costs, dtype=torch.float64)
        )
        return torch.cat(own).double(), shared

    def count_parameters(self, model) -> int:
        scope = list(self._layers(model)) + [self._final_norm(model)]
        return sum(p.numel() for module in scope for p in module.parameters())

    # ---- virtual masking and statistics ---------------------------------------------------

    def output_projections(self, model) -> dict[tuple[int, str], tuple[nn.Linear, int]]:
        """(layer, kind) -> (o_proj or down_proj, channels per unit) for every non-empty module:
        the linear whose input channels are the units' separate contributions."""
        projections = {}
        for i, layer in enumerate(self._layers(model)):
            if not isinstance(layer.self_attn, EmptyAttention):
                projections[(i, HEADS)] = (layer.self_attn.o_proj, layer.self_attn.head_dim)
            projections[(i, NEURONS)] = (layer.mlp.down_proj, 1)
        return projections

    @contextmanager
    def apply_masks(self, model, keep: torch.Tensor):
        """Scale head outputs and neuron activations by ``keep`` (U,) or (B, U) inside the block."""
        layout = self.layout(model)
        keep = keep if keep.dim() == 2 else keep[None]  # (B, U)
        # one host-to-device copy here, not one per hook call and decode step
        keep = keep.to(next(model.parameters()).device)
        projections = self.output_projections(model)
        handles = []
        try:
            for module, mask in layout.split(keep):
                if bool(mask.all()):
                    continue  # nothing removed here: no hook, no cost
                target, width = projections[(module.layer, module.kind)]
                handles.append(target.register_forward_pre_hook(mask_hook(mask, width)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def collect_stats(self, model):
        """Accumulate mean |input| per channel of every o_proj and down_proj."""
        collector = StatsCollector(self, model)
        handles = [
            target.register_forward_pre_hook(collector.hook(layer, kind))
            for (layer, kind), (target, _) in self.output_projections(model).items()
        ]
        try:
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
                    self._slice_heads(model, layer.self_attn, kept)
            elif len(kept) < module.n_units:
                self._slice_gate_up(layer.mlp, kept)
                layer.mlp.down_proj = slice_linear(layer.mlp.down_proj, cols=kept)
        use_kv_mapped_attention(model, self.attention_kind(model))

    def _slice_heads(self, model, attn, kept: torch.Tensor) -> None:
        hd = attn.head_dim
        kv_index = self._kv_index(attn)[kept]  # (n_kept,) old K/V ids
        kv_kept, new_index = torch.unique(kv_index, sorted=True, return_inverse=True)
        q_channels = head_channels(kept, hd)
        self._slice_qkv(attn, q_channels, head_channels(kv_kept, hd))
        attn.o_proj = slice_linear(attn.o_proj, cols=q_channels)
        set_kv_head_index(attn, new_index, device=attn.o_proj.weight.device)
        self._after_attention_resized(model, attn)

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
        return {"family": model.config.model_type, "layers": layers}

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
                self._empty_qkv(attn, hidden, nq, nkv)
                attn.o_proj = empty_linear(nq * hd, hidden, attn.o_proj.bias is not None)
                index = torch.tensor(sizes["kv_head_index"], dtype=torch.long)
                set_kv_head_index(attn, index, device=layer.input_layernorm.weight.device)
                self._after_attention_resized(model, attn)
            self._empty_gate_up(mlp, hidden, inter)
            mlp.down_proj = empty_linear(inter, hidden, mlp.down_proj.bias is not None)
        use_kv_mapped_attention(model, self.attention_kind(model))
