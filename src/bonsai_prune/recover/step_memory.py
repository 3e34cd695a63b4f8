"""How many rows a recovery step can take at once in the memory that is free.

A step holds, beside the weights already loaded, the gradients and AdamW's two moments (three
fp32 copies of the trained parameters) and, for each row, what the backward needs: the
tensors autograd saves in the student's forward and the loss, the teacher's logits and the
logits' gradient. The saved tensors are counted, not modelled: a probe runs the student's
forward and the loss over one short row under ``saved_tensors_hooks`` and adds up the bytes of
the distinct storages, at two lengths; the difference is what each token adds (the rest,
the weights' autocast copies, does not grow with the batch). So the estimate follows the
family, the pruned shapes, the dtype and LoRA without a table of constants.

A row is counted at ``max_length`` tokens, every one scored: the worst a step can draw. What
the counted tensors leave out (the logits themselves, the loss's fp32 gradient buffer, the
allocator's slack between steps of changing shapes) was measured on the packaged model
(README, Recovery; ``scripts/recover_memory.py`` prints both): 0.3-1.9 GiB above the count,
about the size of what the process holds when training starts (1.07 GiB there), which is
therefore counted once more; and a step plans within :data:`HEADROOM` of the free memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bonsai_prune.config import RecoverConfig
from bonsai_prune.memory import resident_bytes
from bonsai_prune.recover.data import TokenBatch
from bonsai_prune.recover.trainer import scored_logits, step_loss, trainable

# the share of the free memory a step may plan to fill: the rest for whatever else the machine
# starts meanwhile (the estimate's own margin is the process's resident memory, above)
HEADROOM = 0.8
_PROBE_TOKENS = (32, 96)


@dataclass(frozen=True)
class StepMemory:
    """Bytes a recovery step adds to the loaded models: fixed, and per row of the batch."""

    state_bytes: int  # gradients, AdamW's two moments, the weights' autocast copies
    row_bytes: int  # one row of max_length tokens, every position scored
    slack_bytes: int = 0  # what the count leaves out: the process's resident memory at the start

    def step_bytes(self, rows: int) -> int:
        return self.state_bytes + self.slack_bytes + rows * self.row_bytes


def saved_bytes(
    student, teacher_dtype: torch.dtype, tokens: int, config: RecoverConfig, autocast_dtype
) -> int:
    """Bytes of the distinct storages autograd saves for the backward of the student's forward
    and ``config``'s loss over one row of ``tokens`` tokens, all scored (no backward is run:
    the probe leaves no gradient behind)."""
    draw = torch.Generator().manual_seed(0)  # the global generator is the training's
    ids = torch.randint(0, student.config.vocab_size, (1, tokens), generator=draw)
    batch = TokenBatch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), tokens)
    storages: dict[int, int] = {}
    resident = {p.untyped_storage().data_ptr() for p in student.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:  # a weight saved as it is costs nothing more
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    # the graph holds every saved tensor until the loss is dropped: no address is reused
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = scored_logits(student, batch, autocast_dtype)
        teacher_logits = torch.zeros(logits.shape, dtype=teacher_dtype)
        loss = step_loss(logits, teacher_logits, batch.labels, config)[0]
    del loss
    return sum(storages.values())


def probe_step_memory(
    student, teacher_dtype: torch.dtype, config: RecoverConfig, autocast_dtype
) -> StepMemory:
    """A step's memory for ``student`` as ``config`` trains it: the saved tensors per token
    from two probe lengths, plus the teacher's logits and the gradient of the student's logits
    per scored token. With LoRA the base model is probed (its adapters' own activations are
    a rank's width) and no optimizer state is counted."""
    if config.train == "lora":
        trained = 0  # the adapters are a sliver of the weights
    else:  # freezes what training will (the tied embedding) first: it changes what is saved
        trained = sum(p.numel() for p in trainable(student, config).values())
    short, long = _PROBE_TOKENS
    at_short = saved_bytes(student, teacher_dtype, short, config, autocast_dtype)
    per_token = (saved_bytes(student, teacher_dtype, long, config, autocast_dtype) - at_short) / (
        long - short
    )
    # what does not grow with the row: the weights' autocast copies (none in fp32)
    copies = max(0, int(at_short - short * per_token))
    vocab = student.config.vocab_size
    logits_dtype = autocast_dtype or torch.float32
    teacher_bytes = teacher_dtype.itemsize if config.kl_weight else 0
    per_token += vocab * (teacher_bytes + logits_dtype.itemsize)
    return StepMemory(
        state_bytes=3 * 4 * trained + copies,
        row_bytes=int(config.max_length * per_token),
        slack_bytes=resident_bytes() or 0,
    )


def rows_that_fit(memory: StepMemory, batch_size: int, free: int | None) -> int:
    """The most rows of a step (at most ``batch_size``) whose estimate stays within
    :data:`HEADROOM` of ``free`` bytes; ``batch_size`` where the free memory is unknown, 0
    where not even one row fits."""
    if free is None:
        return batch_size
    budget = HEADROOM * free - memory.state_bytes - memory.slack_bytes
    if budget < memory.row_bytes:
        return 0
    return min(batch_size, int(budget // memory.row_bytes))
