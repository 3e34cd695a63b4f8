"""Lean greedy decoding for Llama-shaped models on CPU: one token step in a few hundred ops.

Profiling batch-1 decode of the packaged model on 2 cores (fp32) put ~80% of a token's time in
matrix-vector products and ~10 ms in the rest: transformers' per-token machinery (mask and
position bookkeeping, cache objects, module calls, logits processors) around ~2,500 small ops.
That overhead is the same for a dense and a pruned model, so it caps the pruned model's speed-up
well below what its parameter count allows (1.3x instead of ~1.6x at 50%).

The decoder here runs the prompt through the model itself (transformers' forward, so prefill is
exactly the stock computation), copies its K/V into preallocated buffers and then decodes with
the same weights in a short loop per layer:

- q/k/v rows and gate/up rows are concatenated once per weight version (two matrix-vector
  products per layer instead of five);
- every weight a step multiplies (q/k/v, gate/up, o, down, the LM head) is kept once per weight
  version in oneDNN's packed layout where the CPU build has it (:func:`_pack`): ``F.linear``
  re-lays a weight out on each call, which a step of a few rows pays for every weight.
  ``scripts/packed_ab.py`` on the packaged model (dense and a 50% slice, 1 and 16 rows, 2
  cores): 1.45-1.84x faster steps in fp32, the same greedy tokens. The copies cost the
  weights' size in memory while a model decodes (``release_fused`` frees them); a model whose
  copies would take over half the free memory is decoded by transformers instead;
- K/V are written in place into a (B, n_kv, L, d) buffer: no cache objects, no concatenation;
- uneven GQA groups (a sliced layer's ``kv_head_index``) need no K/V gather: a decode step has
  one query per head, so a K/V head's query heads are laid along SDPA's *query* axis, padded to
  the largest group, and attend to that K/V head's keys once;
- ``o_proj`` and ``down_proj`` run their modules' pre-hooks first, so the virtual masks
  (``models.masking``) act exactly as in the stock forward; one with a forward hook (activation
  statistics) is called as a module.

Greedy tokens equal transformers' ``generate`` (tested for every family that supports it, with
left padding, uneven groups, emptied attention layers and MLPs, sliding windows and batched
masks). A family whose layers hold more than this (Gemma's soft-capping and post-norms, Phi-3's
partial rotary) declares why in its adapter's ``lean_decoding`` and is decoded by transformers;
so is a model with other hooks, adapters (peft) or on an accelerator, where transformers has its
own compiled paths.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bonsai_prune.errors import UnsupportedModelError
from bonsai_prune.memory import available_memory
from bonsai_prune.models.adapter import adapter_for
from bonsai_prune.models.attention import EmptyAttention

# hooks these modules may carry: the decoder calls them as modules (masks, statistics)
_HOOKED_OK = ("o_proj", "down_proj")


def why_not_lean(model) -> str | None:
    """None if :func:`greedy_decode` can run ``model``, else the reason it cannot."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        return "not a transformers model: its own generate decodes it"
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError as error:  # an unknown family: transformers decodes it
        return str(error)
    if adapter.lean_decoding is not None:
        return adapter.lean_decoding
    if next(model.parameters()).device.type != "cpu":
        return "the lean decoder is for CPU; transformers' generate runs on accelerators"
    for name, module in model.named_modules():
        hooked = module._forward_hooks or module._forward_pre_hooks
        if hooked and not name.endswith(_HOOKED_OK):
            return f"{name} carries a forward hook the lean decoder would skip"
    for layer in adapter._layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        linears = [mlp.gate_proj, mlp.up_proj]
        if not isinstance(attn, EmptyAttention):
            linears += [attn.q_proj, attn.k_proj, attn.v_proj]
        if any(type(linear) is not nn.Linear for linear in linears):
            return "a projection is not a plain nn.Linear (an adapter such as LoRA is attached)"
    return _why_not_room(model)


def _why_not_room(model) -> str | None:
    """None if the decoder's copies of ``model``'s weights (fused, packed) fit in half the
    memory free now, else why not: a model that fills the machine's memory is decoded by
    transformers, slower, rather than not at all. A model whose copies exist already fits."""
    if model in _FUSED:
        return None
    copies = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear))
    free = available_memory()
    if free is None or copies <= free // 2:
        return None
    return (
        f"its decode copies of the weights ({copies / 2**30:.1f} GiB) would take over half "
        f"the free memory ({free / 2**30:.1f} GiB): transformers' generate decodes it"
    )


@dataclass
class _Layer:
    """One decoder layer's decode-time parts: its modules, and its weights fused and packed."""

    layer: nn.Module
    input_norm: Callable[[torch.Tensor], torch.Tensor]  # the layer's norms (:func:`_norm`)
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: tuple[torch.Tensor, torch.Tensor | None] | None  # fused (rows, hidden) weight, bias
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    o: torch.Tensor | None  # o_proj's weight, packed (None: the layer's attention is empty)
    down: torch.Tensor  # down_proj's weight, packed
    n_q: int
    n_kv: int
    head_dim: int
    group: int  # largest number of query heads on one K/V head
    # (n_q,) query head -> row of the (n_kv * group) query layout; None: the identity
    slots: torch.Tensor | None
    window: int | None


@dataclass
class _Fused:
    """A model's decode-time weights: each layer's, and the LM head's packed weight."""

    layers: list[_Layer]
    head: torch.Tensor
    norm: Callable[[torch.Tensor], torch.Tensor]  # the final norm (:func:`_norm`)


# oneDNN lays a packed weight out for a number of rows; the layout for 16 served 1 and 16 rows
# best of 1/16/64 (a 3072x576 weight, streamed from memory, fp32 and bf16)
_PACK_ROWS = 16


@functools.cache
def _packing_works() -> bool:
    """Whether this torch build packs and multiplies CPU weights in oneDNN's layout."""
    try:
        weight, x = torch.randn(8, 16), torch.randn(2, 16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, F.linear(x, weight), atol=1e-5))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` (out, in) in oneDNN's packed layout, laid out once; ``weight``
    itself where the build, device or dtype has no packed path, or where it is empty (an
    emptied MLP: oneDNN has no layout for 0 rows or columns, and F.linear gives 0-wide
    activations and exact zeros from them)."""
    if (
        weight.numel() == 0
        or weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or not _packing_works()
    ):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a plain or a packed weight."""
    if weight.layout == torch._mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _project(module: nn.Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` through ``weight``, its packed copy. The module's pre-hooks (the virtual
    masks) act on ``x`` first, as a module call runs them; a module with forward hooks
    (activation statistics) or keyword pre-hooks is called as it is."""
    if module._forward_hooks or module._forward_pre_hooks_with_kwargs:
        return module(x)
    for hook in module._forward_pre_hooks.values():
        changed = hook(module, (x,))
        if changed is not None:
            x = changed[0] if isinstance(changed, tuple) else changed
    return _linear(x, weight, module.bias)


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = _pack(torch.cat([linear.weight for linear in linears]))
    if linears[0].bias is None:
        return weight, None
    return weight, torch.cat([linear.bias for linear in linears])


def _group_slots(kv_index: torch.Tensor, n_kv: int) -> tuple[int, torch.Tensor | None]:
    """Largest group and each query head's row in the (n_kv, group) query layout."""
    counts = torch.bincount(kv_index, minlength=n_kv)
    group = int(counts.max())
    rank = torch.zeros_like(kv_index)
    seen = torch.zeros(n_kv, dtype=torch.long)
    for head, kv in enumerate(kv_index.tolist()):
        rank[head], seen[kv] = seen[kv], seen[kv] + 1
    slots = kv_index * group + rank
    if len(kv_index) == n_kv * group and torch.equal(slots, torch.arange(len(kv_index))):
        return group, None  # even groups in order: a plain view
    return group, slots


def _build(model) -> _Fused:
    adapter = adapter_for(model)
    layers = []
    for layer in adapter._layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        gate_up, down = _fuse([mlp.gate_proj, mlp.up_proj]), _pack(mlp.down_proj.weight)
        norms = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        if isinstance(attn, EmptyAttention):
            layers.append(
                _Layer(layer, *norms, None, gate_up, None, down, 0, 0, attn.head_dim, 0, None, None)
            )
            continue
        d = attn.head_dim
        n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        kv_index = getattr(attn, "kv_head_index", None)
        if kv_index is None:
            kv_index = torch.arange(n_q) // (n_q // n_kv)
        group, slots = _group_slots(kv_index.cpu(), n_kv)
        layers.append(
            _Layer(
                layer,
                *norms,
                _fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                gate_up,
                _pack(attn.o_proj.weight),
                down,
                n_q,
                n_kv,
                d,
                group,
                slots,
                adapter.decode_window(model, attn),
            )
        )
    return _Fused(layers, _pack(model.lm_head.weight), _norm(model.model.norm))


# model -> (weight signature, its _Fused): rebuilt when a weight is replaced (slicing) or
# changed in place (training); freed with the model
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fused_for(model) -> _Fused:
    signature = tuple((p.data_ptr(), p._version, tuple(p.shape)) for p in model.parameters())
    cached = _FUSED.get(model)
    if cached is None or cached[0] != signature:
        release_fused(model)  # the stale copy goes before the new one is built
        cached = (signature, _build(model))
        _FUSED[model] = cached
    return cached[1]


def release_fused(model) -> None:
    """Free ``model``'s decode weights (fused and packed copies of its projections and LM head,
    rebuilt by the next generation). Code about to change the weights calls it: the stale copy
    would otherwise stay alive until then, beside what the change itself allocates."""
    _FUSED.pop(model, None)


# Besides its matrix products a decode step is over a thousand small ops (about 40 a layer),
# each paying microseconds of dispatch and Python whatever the model's width. The norms and the
# rotary embedding below compute transformers' floats with fewer of them (1,502 -> 1,173
# top-level ops a step for the packaged model; ``scripts/lean_ab.py`` times the difference).


def _norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward, with fewer ops where it is the Llama RMS norm.

    transformers' RMS norm casts to fp32 and back around its arithmetic; in fp32 both casts
    are no-ops that still dispatch (two of its eight ops, 122 a step for the packaged model).
    The same arithmetic, in the same order, without them gives the same floats; a norm whose
    output on a random input differs (another formula: Gemma's ``1 + weight``, a LayerNorm) is
    called as it is.
    """
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float) or weight.ndim != 1:
        return module
    if weight.dtype == torch.float32:

        def rms_norm(x: torch.Tensor) -> torch.Tensor:
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    else:

        def rms_norm(x: torch.Tensor) -> torch.Tensor:
            x32 = x.float()
            return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(
                weight.dtype
            )

    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0))
    probe = probe.to(weight.device, weight.dtype)
    with torch.no_grad():
        same = torch.equal(rms_norm(probe), module(probe))
    return rms_norm if same else module


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` in four ops rather than six.

    ``rotate_half(x)`` is ``[-x2, x1]``; rolled by half a head, ``x`` is ``[x2, x1]``, and
    ``-a * b == a * -b`` exactly, so ``roll(x) * [-sin1, sin2]`` gives the same floats.
    signed_sin: ``sin`` with its first half negated (:func:`_signed_sin`, once per step).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    first, second = sin.chunk(2, dim=-1)
    return torch.cat((-first, second), dim=-1)


class _Decoder:
    """K/V buffers for B rows and up to ``capacity`` slots, and the one-token step."""

    def __init__(self, model, fused: _Fused, batch: int, capacity: int) -> None:
        self.model, self.layers, self.head, self.norm = model, fused.layers, fused.head, fused.norm
        dtype = next(model.parameters()).dtype
        self.k = [
            torch.empty(batch, s.n_kv, capacity, s.head_dim, dtype=dtype) for s in self.layers
        ]
        self.v = [torch.empty_like(k) for k in self.k]
        self.valid = torch.ones(batch, capacity, dtype=torch.bool)  # padding slots are False

    def load(self, cache, attention_mask: torch.Tensor) -> None:
        """Copy a prefill's K/V (slots 0..P-1) and its padding into the buffers."""
        width = attention_mask.shape[1]
        self.valid[:, :width] = attention_mask.bool()
        for index, spec in enumerate(self.layers):
            if spec.qkv is not None:
                layer = cache.layers[index]
                self.k[index][:, :, :width] = layer.keys
                self.v[index][:, :, :width] = layer.values

    def load_rows(self, rows, cache, length: int, width: int) -> None:
        """Copy the first ``length`` slots of a cache whose rows are ``rows`` of this batch into
        slots ``width - length .. width - 1`` (a left-padded prompt of ``width``): a prompt's
        K/V taken from a longer forward over prompt + continuation (causal attention: the
        prompt's K/V do not depend on what follows)."""
        pad = width - length
        self.valid[rows, :pad] = False
        self.valid[rows, pad:width] = True
        for index, spec in enumerate(self.layers):
            if spec.qkv is not None:
                layer = cache.layers[index]
                for buffer, values in ((self.k[index], layer.keys), (self.v[index], layer.values)):
                    # padding slots are masked out, but an uninitialised NaN times a zero
                    # attention weight is still NaN: they must hold numbers
                    buffer[rows, :, :pad] = 0
                    buffer[rows, :, pad:width] = values[:, :, :length]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits (B, vocab) of the next token after ``tokens`` (B,) at ``positions`` (B,),
        whose K/V go to ``slot``."""
        body = self.model.model
        h = body.embed_tokens(tokens[:, None])  # (B, 1, hidden)
        cos, sin = body.rotary_emb(h, positions[:, None])  # (B, 1, d)
        signed_sin = _signed_sin(sin)
        masks: dict[int | None, torch.Tensor | None] = {}
        for index, spec in enumerate(self.layers):
            h = h + self._attention(index, spec, h, cos, signed_sin, slot, masks)
            mlp = spec.layer.mlp
            gate, up = _linear(spec.post_norm(h), *spec.gate_up).chunk(2, dim=-1)
            h = h + _project(mlp.down_proj, spec.down, mlp.act_fn(gate) * up)
        return _linear(self.norm(h), self.head, self.model.lm_head.bias)[:, -1]

    def _mask(self, window: int | None, slot: int, masks: dict) -> torch.Tensor | None:
        """(B, 1, 1, slot + 1) keys a query at ``slot`` may read; None when all may."""
        if window not in masks:
            allowed = self.valid[:, : slot + 1]
            if window is not None and slot + 1 > window:
                allowed = allowed.clone()
                allowed[:, : slot + 1 - window] = False
            masks[window] = None if bool(allowed.all()) else allowed[:, None, None, :]
        return masks[window]

    def _attention(self, index, spec: _Layer, h, cos, signed_sin, slot: int, masks) -> torch.Tensor:
        layer = spec.layer
        attn = layer.self_attn
        if spec.qkv is None:  # emptied: zero, plus the o_proj bias a model may have had
            return h.new_zeros(()) if attn.o_bias is None else attn.o_bias
        b, d = h.shape[0], spec.head_dim
        qkv = _linear(spec.input_norm(h), *spec.qkv).view(b, spec.n_q + 2 * spec.n_kv, d)
        if hasattr(attn, "q_norm"):  # Qwen3: RMS norm over each head's dims, then rotary
            q, k, v = qkv.split([spec.n_q, spec.n_kv, spec.n_kv], dim=1)
            q = _rope(attn.q_norm(q), cos, signed_sin)
            k = _rope(attn.k_norm(k), cos, signed_sin)
        else:  # q and k side by side: rotated in one go
            qk, v = qkv.split([spec.n_q + spec.n_kv, spec.n_kv], dim=1)
            q, k = _rope(qk, cos, signed_sin).split([spec.n_q, spec.n_kv], dim=1)  # (B, heads, d)
        self.k[index][:, :, slot], self.v[index][:, :, slot] = k, v
        if spec.slots is None:
            grouped = q.reshape(b, spec.n_kv, spec.group, d)
        else:
            grouped = q.new_zeros(b, spec.n_kv * spec.group, d)
            grouped[:, spec.slots] = q
            grouped = grouped.view(b, spec.n_kv, spec.group, d)
        # the group's query heads stand on SDPA's query axis: one K/V head read once for all
        out = F.scaled_dot_product_attention(
            grouped,
            self.k[index][:, :, : slot + 1],
            self.v[index][:, :, : slot + 1],
            attn_mask=self._mask(spec.window, slot, masks),
            scale=attn.scaling,
        ).reshape(b, spec.n_kv * spec.group, d)
        if spec.slots is not None:
            out = out[:, spec.slots]
        return _project(attn.o_proj, spec.o, out.reshape(b, 1, spec.n_q * d))


def cache_keyword(model) -> str:
    """The forward's K/V cache argument: ``cache`` from transformers 5.24, ``past_key_values``
    before (5.24 still takes the old name, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill_decoder(model, batch: int, capacity: int) -> _Decoder:
    """Empty K/V buffers for ``batch`` rows and ``capacity`` slots, for a caller that fills
    the prompts' K/V itself (``_Decoder.load_rows``) and then calls :func:`greedy_decode` with
    ``prefilled``."""
    return _Decoder(model, _fused_for(model), batch, capacity)


@torch.no_grad()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    pad_token_id: int,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prefilled: tuple[_Decoder, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Greedy continuation of left-padded prompts, as transformers' ``generate`` gives it.

    input_ids, attention_mask: (B, P). stop(sequences (B, P + t)) -> (B,) bool marks rows that
    have ended (their later tokens are ``pad_token_id``); decoding ends when every row has or
    after ``max_new_tokens``. None: never stop early (a speed measurement). Returns (B, P + T).
    prefilled: (decoder holding the prompts' K/V, logits (B, V) after each prompt's last
    token), from a caller that already ran the prompts; None: prefill here.
    Call :func:`why_not_lean` first: this function assumes the model qualifies.
    """
    b, width = input_ids.shape
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    if prefilled is None:
        decoder, logits = _prefill(model, input_ids, attention_mask, positions, max_new_tokens)
    else:
        decoder, logits = prefilled
    sequences = torch.full((b, width + max_new_tokens), pad_token_id, dtype=input_ids.dtype)
    sequences[:, :width] = input_ids
    running = torch.ones(b, dtype=torch.bool)
    next_position = positions[:, -1] + 1
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1).where(running, pad_token_id)
        sequences[:, width + step] = tokens
        if stop is not None:
            running &= ~stop(sequences[:, : width + step + 1])
            if not bool(running.any()):
                return sequences[:, : width + step + 1]
        if step + 1 < max_new_tokens:
            logits = decoder.step(tokens, next_position + step, width + step)
    return sequences


def _prefill(model, input_ids, attention_mask, positions, max_new_tokens: int):
    """transformers' forward over the prompts, its K/V copied into a decoder's buffers."""
    from transformers import DynamicCache

    b, width = input_ids.shape
    cache = DynamicCache()  # full layers: the buffers hold every slot, windows are masks
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(model): cache},
    ).logits[:, -1]
    decoder = _Decoder(model, _fused_for(model), b, width + max_new_tokens)
    decoder.load(cache, attention_mask)
    return decoder, logits
