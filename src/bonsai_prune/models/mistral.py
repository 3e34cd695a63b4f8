"""Adapter for Mistral: sliding-window attention.

The window is in the attention mask, which transformers builds for the model's attention
implementation; the K/V-gathering implementations register the stock mask functions
(``sdpa_mask``, ``eager_mask``), so a sliced Mistral keeps its window. The layers are
Llama-shaped, so :class:`LlamaAdapter` does the rest.
"""

from __future__ import annotations

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.llama import LlamaAdapter


@ADAPTERS.register("mistral")
class MistralAdapter(LlamaAdapter):
    """``MistralForCausalLM``: the Llama logic; the sliding window lives in the mask."""

    def decode_window(self, model, attn) -> int | None:
        return model.config.sliding_window  # every layer's, read by the model, not the module
