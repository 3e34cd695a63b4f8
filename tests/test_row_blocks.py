"""Row-wise vocabulary functions a block of rows at a time: the same values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bonsai_prune.core.row_blocks import ROWS, block_sizes, by_row_blocks
from bonsai_prune.methods import finercut
from bonsai_prune.recover.loss import distill_kl, token_ce


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 65, 100, 1500])
def test_blocks_cover_the_rows_nearly_evenly(n):
    sizes = block_sizes(n)
    assert sum(sizes) == n and all(0 < s <= ROWS for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1  # no lone last row
    assert len(sizes) == -(-n // ROWS)


def _kl_whole(s, t, temperature):
    """The definition, all rows at once."""
    log_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean() * temperature**2


def _assert_same_value_and_gradient(student, blocked_fn, whole_fn):
    """The blocked loss and its definition over all rows: the same value and gradient."""
    grads = []
    for fn in (blocked_fn, whole_fn):
        s = student.clone().requires_grad_(True)
        value = fn(s)
        value.backward()
        grads.append((value.detach(), s.grad))
    (blocked, g_blocked), (whole, g_whole) = grads
    torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_blocked, g_whole, rtol=1e-6, atol=1e-12)
    assert float(whole) > 0


@pytest.mark.parametrize("n", [1, 33, 97])
def test_blocked_kl_has_the_whole_kl_value_and_gradient(n):
    torch.manual_seed(n)
    teacher = torch.randn(n, 3000, dtype=torch.bfloat16) * 3
    student = (teacher.float() + torch.randn(n, 3000)).to(torch.bfloat16)
    _assert_same_value_and_gradient(
        student, lambda s: distill_kl(s, teacher, 2.0), lambda s: _kl_whole(s, teacher, 2.0)
    )


@pytest.mark.parametrize("n", [1, 33, 97])
def test_blocked_ce_has_the_whole_ce_value_and_gradient(n):
    torch.manual_seed(n)
    student = (torch.randn(n, 3000) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 3000, (n,))
    _assert_same_value_and_gradient(
        student, lambda s: token_ce(s, labels), lambda s: F.cross_entropy(s.float(), labels)
    )


def test_blocked_js_has_the_whole_rows_values():
    torch.manual_seed(0)
    log_p = torch.randn(70, 2000).log_softmax(-1)
    log_q = (log_p + 0.5 * torch.randn(70, 2000)).log_softmax(-1)
    blocked = finercut.js_divergence(log_p, log_q)
    torch.testing.assert_close(blocked, finercut._row_js(log_p, log_q), rtol=1e-6, atol=0)
    assert blocked.shape == (70,)


def test_a_function_of_several_tensors_gets_matching_blocks():
    a, b = torch.arange(70.0)[:, None], torch.arange(70.0)[:, None] * 2
    out = by_row_blocks(lambda x, y: (x + y)[:, 0], a, b)
    assert torch.equal(out, torch.arange(70.0) * 3)
