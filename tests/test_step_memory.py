"""A recovery step's memory: the probe counts what autograd keeps, and the plan fits the
rows of a step into the free memory (its use by ``recover``: tests/test_recover.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_recover import FAST

from bonsai_prune.recover import RecoverConfig
from bonsai_prune.recover.step_memory import (
    StepMemory,
    probe_step_memory,
    rows_that_fit,
    saved_bytes,
)

GIB = 2**30


def test_rows_that_fit_leave_headroom_and_never_exceed_the_batch():
    memory = StepMemory(state_bytes=GIB // 2, row_bytes=GIB // 2, slack_bytes=GIB // 2)
    assert rows_that_fit(memory, 8, None) == 8  # free memory unknown: the whole batch
    assert rows_that_fit(memory, 8, 100 * GIB) == 8
    assert rows_that_fit(memory, 8, 4 * GIB) == 4  # 0.8 * 4 - 1 = 2.2 GiB: four rows
    assert rows_that_fit(memory, 8, int(1.9 * GIB)) == 1
    assert rows_that_fit(memory, 8, int(1.8 * GIB)) == 0  # 0.44 GiB left: not one row
    assert memory.step_bytes(4) == 3 * GIB


def test_the_probe_grows_with_the_row_and_counts_no_weight_twice():
    model = tiny_llama(seed=0).float()
    config = RecoverConfig(**FAST)
    # fp32 saves the weights themselves: nothing but the activations grows with the batch
    saved = [saved_bytes(model, torch.float32, n, config, None) for n in (32, 64, 96)]
    assert saved[0] < saved[1] < saved[2]
    assert saved[2] - saved[1] == pytest.approx(saved[1] - saved[0], rel=0.05)  # linear
    memory = probe_step_memory(model, torch.float32, config, None)
    embed = model.get_input_embeddings().weight
    trained = sum(p.numel() for p in model.parameters() if p is not embed)
    assert not embed.requires_grad  # frozen, as training will
    assert memory.state_bytes == pytest.approx(12 * trained, abs=1024)  # grads + two moments
    vocab = model.config.vocab_size
    assert memory.row_bytes >= config.max_length * vocab * 8  # teacher logits + their gradient
    longer = probe_step_memory(
        model, torch.float32, RecoverConfig(**{**FAST, "max_length": 192}), None
    )
    assert longer.row_bytes == pytest.approx(2 * memory.row_bytes, rel=0.01)
    # bf16 autocast keeps half-width activations but copies each weight once
    half = probe_step_memory(model, torch.bfloat16, config, torch.bfloat16)
    assert half.row_bytes < memory.row_bytes and half.state_bytes > memory.state_bytes
    lora = probe_step_memory(model, torch.float32, RecoverConfig(**FAST, train="lora"), None)
    assert lora.state_bytes == 0
