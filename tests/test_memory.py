"""Memory given back to the OS: the allocator's free pages, and checkpoint files' maps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from bonsai_prune.memory import peak_resident_bytes, release_free_memory, resident_bytes
from bonsai_prune.recover.checkpoint import load_checkpoint, save_checkpoint

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)"
)


def _rss_mb() -> float:
    return resident_bytes() / 2**20


@linux_only
def test_freed_heap_pages_go_back_to_the_os():
    if not release_free_memory():
        pytest.skip("the C library is not glibc: nothing to trim")
    big = torch.ones(1 << 20)  # 4 MB: mmapped; freeing it raises glibc's mmap threshold
    del big
    chunks = [torch.ones(500_000) for _ in range(100)]  # 2 MB each, now from the heap
    last = chunks[-1]  # alive at the heap's top, so free() alone cannot shrink the heap
    del chunks
    before = _rss_mb()
    release_free_memory()
    assert before - _rss_mb() > 100  # ~200 MB of freed tensors
    assert peak_resident_bytes() / 2**20 > _rss_mb() + 50  # the peak keeps what was given back
    assert float(last[0]) == 1.0


@linux_only
def test_a_loaded_checkpoint_does_not_keep_its_file_mapped(tmp_path):
    path = tmp_path / "last.safetensors"
    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = torch.optim.AdamW([param], foreach=False)
    param.grad = torch.ones_like(param)
    optimizer.step()
    save_checkpoint(path, 1, {"w": param.detach()}, optimizer, ["w"], {"step": 1})
    ckpt = load_checkpoint(path)
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert torch.equal(ckpt.params["w"], param.detach())
    assert set(ckpt.optimizer_state["w"]) == {"step", "exp_avg", "exp_avg_sq"}
