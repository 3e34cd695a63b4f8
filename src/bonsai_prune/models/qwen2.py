"""Adapter for Qwen2 and Qwen2.5: biases on q, k and v.

The biases go with their rows: ``slice_linear`` slices a bias with the rows it selects, a head's
cost counts its q bias and a share of its group's k/v biases, and ``restructure`` builds biased
projections when the dense model has them. All of that is in :class:`LlamaAdapter`, written
for any bias; o_proj has none here. Qwen2's optional sliding-window layers (``layer_types``)
reach the K/V-gathering attention through the mask, like Mistral's.
"""

from __future__ import annotations

from bonsai_prune.models.adapter import ADAPTERS
from bonsai_prune.models.llama import LlamaAdapter


@ADAPTERS.register("qwen2")
class Qwen2Adapter(LlamaAdapter):
    """``Qwen2ForCausalLM``: the Llama logic, with biased q/k/v."""
