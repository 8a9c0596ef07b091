"""Chunked cross-entropy equals the plain one, loss and gradients, without full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora.nn.chunked_ce import chunked_linear_cross_entropy


@pytest.mark.parametrize("tokens,vocab,chunk", [(37, 101, 8), (64, 50, 64), (5, 1000, 2)])
def test_matches_plain_cross_entropy_and_gradients(tokens, vocab, chunk):
    gen = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, 24, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    w = (torch.randn(vocab, 24, generator=gen) * 0.3).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[::3] = -100
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ours = chunked_linear_cross_entropy(h, w, labels, chunk=chunk)
    plain = F.cross_entropy(h2 @ w2.t(), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    (ours * 0.5).backward()
    (plain * 0.5).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_shapes_are_checked():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8)
    chunked_linear_cross_entropy(h, w, torch.tensor([1, 2, -100, 4, 5, 6]), chunk=4).backward()
    assert h.grad is not None and w.grad is None
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_linear_cross_entropy(torch.randn(2, 3, 8), w, torch.zeros(6, dtype=torch.long))
