"""Configuration of a Llama whose layers were pruned unevenly (written by bonsai-prune).

The global sizes (``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``)
are the dense model's, kept so that transformers' checks and tools that read them still work.
Each layer's real shape comes from three per-layer lists:

- ``layer_query_heads[i]``: query heads of layer i (0: the layer has no attention);
- ``layer_kv_head_index[i]``: for each of those query heads, the K/V head it reads
  (groups may be uneven: [0, 0, 0, 1, 2, 2]); layer i has ``max + 1`` K/V heads;
- ``layer_intermediate_sizes[i]``: MLP width of layer i (0: the layer has no MLP).

This file depends on transformers alone.
"""

from transformers import LlamaConfig


class BonsaiLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer head counts, K/V head maps and MLP widths."""

    model_type = "bonsai_llama"

    def layer_shape(self, index: int) -> tuple[int, list[int], int]:
        """(query heads, K/V index per query head, MLP width) of layer ``index``."""
        heads = getattr(self, "layer_query_heads", None)
        if heads is None:  # a plain Llama config: every layer dense
            groups = self.num_attention_heads // self.num_key_value_heads
            kv_index = [h // groups for h in range(self.num_attention_heads)]
            return self.num_attention_heads, kv_index, self.intermediate_size
        return (
            int(heads[index]),
            [int(k) for k in self.layer_kv_head_index[index]],
            int(self.layer_intermediate_sizes[index]),
        )
