"""Adapter for Qwen3 (dense): per-head RMS norms on q and k, head_dim not hidden / heads.

``q_norm`` and ``k_norm`` normalise each head over its head_dim with one weight vector shared by
all heads, so slicing heads leaves them as they are; they go only with the layer's last head,
so :class:`LlamaAdapter` shares their parameters equally among the layer's heads in the unit
costs (``_shared_head_parameters``). Every size is read from ``attn.head_dim``, never from
hidden / heads, so head_dim = 128 with hidden = 1024 and 16 heads needs nothing more.
"""

from __future__ import annotations

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.llama import LlamaAdapter


@ADAPTERS.register("qwen3")
class Qwen3Adapter(LlamaAdapter):
    """``Qwen3ForCausalLM``: the Llama logic; q/k norms are shared per layer."""
