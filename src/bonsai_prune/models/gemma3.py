"""Adapter for Gemma 3 text models (``gemma3_text``, ``Gemma3ForCausalLM``).

Gemma 3 has Gemma 2's pre- and post-norms, scaled embeddings and alternating sliding windows,
plus Qwen3-style per-head-dim ``q_norm``/``k_norm`` and head_dim != hidden / heads; all are
handled by :class:`LlamaAdapter` (see qwen3.py and gemma2.py for why). Unlike Gemma 2 it
runs SDPA: transformers 5.24's Gemma3Attention keeps ``attn_logit_softcapping`` from the
config but never passes it to the attention function, so there is nothing to soft-cap.
The multimodal ``gemma3`` model (vision tower, layers under ``model.language_model``) is not
covered.
"""

from __future__ import annotations

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.llama import LlamaAdapter


@ADAPTERS.register("gemma3_text")
class Gemma3Adapter(LlamaAdapter):
    """``Gemma3ForCausalLM``: the Llama logic; q/k norms shared per layer."""

    lean_decoding = "Gemma 3's post-norms and scaled embedding are not in the lean decoder"
