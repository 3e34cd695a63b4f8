"""A Llama whose layers have their own head counts, K/V groups and MLP widths (bonsai-prune).

Stock transformers builds every layer from the global config, so a checkpoint with uneven
layers fails with size mismatches. This model builds each layer at its pruned shape straight
away (no dense model first) from ``BonsaiLlamaConfig``'s per-layer lists:

- attention gathers, for each query head, the K/V head named by the layer's map, then runs
  the attention function the config selects (sdpa, eager, ...) as one K/V head per query
  head; uneven groups ([3, 1, 2] query heads over 3 K/V heads) are exact;
- a layer with 0 query heads has an :class:`EmptyAttention` that adds nothing; it still
  writes one number per token to the KV cache so the cache length stays right;
- an MLP may have any width, 0 included (it then adds nothing).

Weight names equal the stock Llama's, so the safetensors are the ones any Llama would have.
This file depends on torch and transformers alone.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_bonsai_llama import BonsaiLlamaConfig


class BonsaiLlamaMLP(nn.Module):
    """Gated MLP of a given width (the stock one reads the width from the global config)."""

    def __init__(self, config: BonsaiLlamaConfig, width: int):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BonsaiLlamaAttention(LlamaAttention):
    """Llama attention with ``len(kv_head_index)`` query heads, each reading its own K/V head."""

    def __init__(self, config: BonsaiLlamaConfig, layer_idx: int, kv_head_index: list[int]):
        nn.Module.__init__(self)
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.num_key_value_groups = 1  # K/V are gathered per query head before attention
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.kv_head_index = list(kv_head_index)
        n_q, n_kv = len(kv_head_index), max(kv_head_index) + 1
        bias, hidden, hd = config.attention_bias, config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, n_q * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv * hd, bias=bias)
        self.o_proj = nn.Linear(n_q * hd, hidden, bias=bias)
        self._index_by_device: dict[torch.device, torch.Tensor] = {}

    def _index(self, device: torch.device) -> torch.Tensor | None:
        """LongTensor (n_q,) on ``device``, or None where the groups are the trivial 1:1 map."""
        if self.kv_head_index == list(range(len(self.kv_head_index))):
            return None
        if device not in self._index_by_device:
            self._index_by_device[device] = torch.tensor(self.kv_head_index, device=device)
        return self._index_by_device[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        # transformers >= 5.24 passes the cache as ``cache``, earlier releases as ``past_key_values``
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, n_q, s, d)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, n_kv, s, d)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (b, n_kv, s, d)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            key, value = cache.update(key, value, self.layer_idx, cache_kwargs)
        index = self._index(key.device)
        if index is not None:
            key, value = key.index_select(1, index), value.index_select(1, index)  # (b, n_q, s, d)
        implementation = self.config._attn_implementation
        # indexing, not get_interface(): transformers before 5 has only the former
        attention = (
            eager_attention_forward
            if implementation in (None, "eager")
            else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()  # (b, s, n_q * d)
        return self.o_proj(out), weights


class EmptyAttention(nn.Module):
    """An attention sub-layer whose query heads were all removed: it adds zero.

    It still writes a (b, 1, s, 1) zero placeholder to the KV cache: transformers reads the
    cached length from layer 0, and a cache with no elements would report 0 tokens.
    """

    def __init__(self, config: BonsaiLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # the o_proj bias is all an emptied layer keeps (bonsai-prune saves it as ``o_bias``)
        bias = getattr(config, "attention_bias", False)
        self.o_bias = nn.Parameter(torch.zeros(config.hidden_size)) if bias else None

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):  # noqa: E501
        cache = cache if cache is not None else past_key_values
        b, s, _ = hidden_states.shape
        if cache is not None:
            placeholder = hidden_states.new_zeros(b, 1, s, 1)  # (b, 1 "head", s, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


class BonsaiLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer at its own pruned shape (the forward is the stock one)."""

    def __init__(self, config: BonsaiLlamaConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.gradient_checkpointing = False
        self.hidden_size = config.hidden_size
        n_heads, kv_index, width = config.layer_shape(layer_idx)
        if n_heads == 0:
            self.self_attn = EmptyAttention(config, layer_idx)
        else:
            self.self_attn = BonsaiLlamaAttention(config, layer_idx, kv_index)
        self.mlp = BonsaiLlamaMLP(config, width)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class BonsaiLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = BonsaiLlamaConfig
    _no_split_modules = ["BonsaiLlamaDecoderLayer"]


class BonsaiLlamaModel(BonsaiLlamaPreTrainedModel, LlamaModel):
    """LlamaModel built layer by layer at the pruned shapes; its forward is the stock one."""

    def __init__(self, config: BonsaiLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [BonsaiLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class BonsaiLlamaForCausalLM(BonsaiLlamaPreTrainedModel, LlamaForCausalLM):
    """Causal LM head on :class:`BonsaiLlamaModel` (tied embeddings as the config says)."""

    def __init__(self, config: BonsaiLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = BonsaiLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["BonsaiLlamaForCausalLM", "BonsaiLlamaModel", "BonsaiLlamaPreTrainedModel"]
