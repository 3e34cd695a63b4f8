"""Distillation losses on the scored (solution) positions only: pure tensor functions.

Forward KL(teacher || student) at temperature T, scaled by T^2 so its gradient keeps the
same size as T changes (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bonsai_prune.core.row_blocks import by_row_blocks


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(softmax(t/T) || softmax(s/T)); a scalar.

    student_logits, teacher_logits: (n_tokens, V), any float dtype (computed in fp32, a block
    of rows at a time: :mod:`bonsai_prune.core.row_blocks`).
    """
    kl = by_row_blocks(lambda s, t: _row_kl(s, t, temperature), student_logits, teacher_logits)
    return kl.mean() * temperature**2


def _row_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) per row (n,), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (n, V)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1)


def token_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next tokens ``labels`` (n_tokens,) under the student; a scalar.

    In fp32 a block of rows at a time, as the KL: over 1,500 rows of the packaged model's
    vocabulary, forward and backward, 0.54 s -> 0.32 s (fastest of 12, 2 cores, the study
    running beside), the same gradient bit for bit."""
    return by_row_blocks(_row_ce, student_logits, labels).mean()


def _row_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row (n,), in fp32."""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def recovery_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    kl_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, kl, ce)``: loss = kl_weight * KL + ce_weight * CE; a weight of 0 skips its term."""
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kl = distill_kl(student_logits, teacher_logits, temperature) if kl_weight else zero
    ce = token_ce(student_logits, labels) if ce_weight else zero
    return kl_weight * kl + ce_weight * ce, kl.detach(), ce.detach()
