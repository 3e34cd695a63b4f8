"""Exact rewrite of uneven GQA groups into the equal contiguous groups llama.cpp expects.

llama.cpp (like stock transformers) maps query head h to K/V head ``h // (n_q / n_kv)``. A
pruned layer may read its K/V heads unevenly (query heads -> [0, 0, 0, 1, 2, 2]). Two moves
keep the layer's function exactly:

- reordering query heads (q rows and o columns together) changes nothing: attention heads
  are summed by o_proj, so their order is free;
- copying a K/V head gives its readers the same keys and values; a zero query head (zero q
  rows, zero o columns) adds exactly zero.

So each K/V head k read by g_k query heads becomes ceil(g_k / s) copies, each read by s
query heads, padded with zero heads; the group size s is the one with fewest parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupPlan:
    """How a layer's heads are laid out after the rewrite."""

    query_source: tuple[int | None, ...]  # new query slot -> old query head (None: zero head)
    kv_source: tuple[int, ...]  # new K/V head -> old K/V head it copies
    group_size: int  # query heads per K/V head, equal and contiguous

    @property
    def n_query_heads(self) -> int:
        return len(self.query_source)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_source)


def plan_equal_groups(kv_head_index: list[int]) -> GroupPlan:
    """The cheapest exact layout with equal contiguous groups for a query head -> K/V head map.

    Cost counts q, o, k and v rows alike: 2 per query slot, 2 per K/V head."""
    if not kv_head_index:
        return GroupPlan((), (), 1)
    n_kv = max(kv_head_index) + 1
    readers = [[h for h, k in enumerate(kv_head_index) if k == kv] for kv in range(n_kv)]
    readers = [r for r in readers if r]  # an unread K/V head is dropped
    sources = [kv_head_index[r[0]] for r in readers]
    largest = max(len(r) for r in readers)

    def cost(s: int) -> int:
        copies = sum(math.ceil(len(r) / s) for r in readers)
        return 2 * s * copies + 2 * copies

    size = min(range(1, largest + 1), key=lambda s: (cost(s), -s))
    query_source: list[int | None] = []
    kv_source: list[int] = []
    for group, source in zip(readers, sources, strict=True):
        for start in range(0, len(group), size):
            chunk = group[start : start + size]
            query_source += chunk + [None] * (size - len(chunk))
            kv_source.append(source)
    return GroupPlan(tuple(query_source), tuple(kv_source), size)


def rewrite_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    plan: GroupPlan,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply ``plan`` to one layer's weights: q (n_q*d, hidden), k/v (n_kv*d, hidden),
    o (hidden, n_q*d) -> the same layer with plan's equal groups (no biases)."""
    hidden = q.shape[1]
    q_heads = q.reshape(-1, head_dim, hidden)  # (n_q, d, hidden)
    o_heads = o.reshape(o.shape[0], -1, head_dim)  # (hidden, n_q, d)
    zero_q = q_heads.new_zeros(head_dim, hidden)
    zero_o = o_heads.new_zeros(o.shape[0], head_dim)
    new_q = torch.stack([zero_q if h is None else q_heads[h] for h in plan.query_source])
    new_o = torch.stack([zero_o if h is None else o_heads[:, h] for h in plan.query_source], 1)
    kv_index = torch.tensor(plan.kv_source, dtype=torch.long)
    new_k = k.reshape(-1, head_dim, hidden).index_select(0, kv_index)  # (n_kv', d, hidden)
    new_v = v.reshape(-1, head_dim, hidden).index_select(0, kv_index)
    return (
        new_q.reshape(-1, hidden),
        new_k.reshape(-1, hidden),
        new_v.reshape(-1, hidden),
        new_o.reshape(o.shape[0], -1),
    )
