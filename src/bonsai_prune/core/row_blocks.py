"""Row-wise functions over the vocabulary, computed a block of rows at a time.

A float32 row over the packaged model's vocabulary (49,152 tokens) is 197 KB. An elementwise
chain over n such rows (a log-softmax, exponentials, products, a sum per row) streams every
intermediate through main memory; 32 rows (6 MB) stay in a 32 MB L3 cache from one op of the
chain to the next. Measured on 2 cores: KL(teacher || student) over 1,500 rows, forward and
backward, 1.30 s -> 0.26 s; FinerCut's Jensen-Shannon over a candidate's 773 positions 399 ->
91 ms (blocks of 64 rows: 285 ms, past the cache; of 16: 82 ms). Each row is computed alone
either way, so the values do not change (bit for bit on that machine; where a block has fewer
rows than the machine has threads, a row's sum may be split across threads and round
differently in the last bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

ROWS = 32


def block_sizes(n: int, rows: int = ROWS) -> list[int]:
    """Near-equal block sizes of at most ``rows`` covering ``n`` rows (no lone last row)."""
    if n <= 0:
        return []
    blocks = math.ceil(n / rows)
    base, extra = divmod(n, blocks)
    return [base + 1] * extra + [base] * (blocks - extra)


def by_row_blocks(
    fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, rows: int = ROWS
) -> torch.Tensor:
    """``fn(*tensors)`` (n,) for a ``fn`` that maps (b, ...) tensors to (b,) row by row,
    called on blocks of rows and concatenated.

    The blocks come from ``torch.split``, whose backward writes every block's gradient into
    one buffer; indexing each block would allocate a zero gradient of the whole (n, V) per
    block (measured: a backward 10x slower than no blocks at all)."""
    sizes = block_sizes(tensors[0].shape[0], rows)
    if len(sizes) <= 1:
        return fn(*tensors)
    blocks = zip(*(t.split(sizes) for t in tensors), strict=True)
    return torch.cat([fn(*parts) for parts in blocks])
