"""Adapter for Gemma 2: attention-logit soft-capping, pre- and post-norms, scaled embeddings.

Soft-capping (``tanh`` on the attention scores) has no SDPA path; transformers runs Gemma 2
eagerly. Sliced layers therefore run ``bonsai_eager``: K/V gathered by ``kv_head_index``, then
Gemma 2's own ``eager_attention_forward``, so soft-capping stays exact. The post-attention norm
of an emptied attention layer norms zero to zero, so :class:`EmptyAttention` stays exact too.
The extra norms are counted with the layer; the scaled embedding is outside the pruned scope.
Alternating sliding windows live in the per-layer masks (``eager_mask``).
"""

from __future__ import annotations

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.attention import EAGER
from bonsai_prune.models.llama import LlamaAdapter


@ADAPTERS.register("gemma2")
class Gemma2Adapter(LlamaAdapter):
    """``Gemma2ForCausalLM``: the Llama logic over the eager, soft-capping attention."""

    lean_decoding = (
        "Gemma 2's soft-capping, post-norms and scaled embedding are not in the lean decoder"
    )

    def attention_kind(self, model) -> str:
        return EAGER  # Gemma2 declares no SDPA support, with or without soft-capping
