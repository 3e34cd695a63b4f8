"""Attention that understands uneven GQA groups, and the stand-in for an emptied attention layer.

Once a layer is sliced its groups may be uneven (say 3, 1 and 2 query heads over 3 K/V heads),
which the stock HF attention (``repeat_kv`` by a single group size) cannot express. Each sliced
attention module therefore carries ``kv_head_index`` (its query head -> K/V head map, a
non-persistent long buffer that moves with the model), and the model runs one of two attention
functions registered with transformers' ``AttentionInterface``:

- ``bonsai_sdpa``: gather K/V by that map, then transformers' SDPA (the fast path);
- ``bonsai_eager``: gather K/V by that map, then the family's own ``eager_attention_forward``
  (found in the module that defines the attention class), for what SDPA cannot do exactly,
  such as Gemma 2's attention-logit soft-capping.

Both get the matching mask function, so sliding windows and padding behave as in the stock model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

SDPA, EAGER = "sdpa", "eager"
IMPLEMENTATIONS = {SDPA: "bonsai_sdpa", EAGER: "bonsai_eager"}


def gather_kv(module, key: torch.Tensor, value: torch.Tensor):
    """K/V (b, n_kv, s, d) -> (b, n_query_heads, s, d) by ``module.kv_head_index``, if any."""
    index = getattr(module, "kv_head_index", None)
    if index is None:
        return key, value
    index = index.to(key.device)  # a no-op when the buffer moved with the model
    return key.index_select(1, index), value.index_select(1, index)


def _kv_mapped_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA where each query head reads the K/V head named by ``module.kv_head_index``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = gather_kv(module, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _kv_mapped_eager(module, query, key, value, attention_mask, **kwargs):
    """The family's eager attention (soft-capping and all) after the K/V gather."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    key, value = gather_kv(module, key, value)
    return eager(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(IMPLEMENTATIONS[SDPA], _kv_mapped_sdpa)
    AttentionMaskInterface.register(IMPLEMENTATIONS[SDPA], sdpa_mask)
    AttentionInterface.register(IMPLEMENTATIONS[EAGER], _kv_mapped_eager)
    AttentionMaskInterface.register(IMPLEMENTATIONS[EAGER], eager_mask)


def use_kv_mapped_attention(model, kind: str = SDPA) -> None:
    """Switch ``model`` to the attention function (``kind``: sdpa or eager) for uneven groups."""
    _register_attention()
    model.set_attn_implementation(IMPLEMENTATIONS[kind])


def set_kv_head_index(attn: nn.Module, index: torch.Tensor, device=None) -> None:
    """Give ``attn`` its query head -> K/V head map (n_query_heads,) long."""
    # Structure, not a mask: it lives with the module like its weight shapes do, so that
    # model.to(device) moves it; integer buffers keep their dtype under model.to(dtype).
    attn.register_buffer("kv_head_index", index.to(device), persistent=False)
    attn.num_key_value_groups = 1  # K/V are gathered per query head by kv_head_index


class EmptyAttention(nn.Module):
    """Stands in for an attention sub-layer whose query heads have all been removed.

    Its output is zero (plus the o_proj bias, if the model had one), exactly what the fully
    masked attention gives (families that norm the attention output, like Gemma, norm zero to
    zero). It still writes to the KV cache: transformers reads the cached sequence length from
    layer 0 (``get_seq_length()``) to place new tokens, and a zero-head (b, 0, s, head_dim)
    tensor would not count (``DynamicLayer.get_seq_length`` returns 0 for a cache with no
    elements), so the layer caches a (b, 1, s, 1) zero placeholder instead: one number per token.
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
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        # transformers 5.24 passes the cache as ``cache``; older releases as ``past_key_values``
        cache = cache if cache is not None else past_key_values
        b, s, _ = hidden_states.shape
        if cache is not None:
            placeholder = hidden_states.new_zeros(b, 1, s, 1)  # (b, 1 "head", s, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = torch.zeros_like(hidden_states)  # (b, s, hidden)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None
