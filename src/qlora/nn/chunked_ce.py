"""Cross-entropy over the output head without materializing all logits.

``loss = sum_i [logsumexp(h_i W^T) - (h_i W^T)[y_i]]`` over the rows whose
label is not ignored. The plain path builds the ``[tokens, vocab]`` logits
(and their float32 copy and gradient): for Llama-3 (vocab 128256) at 8k
tokens that is 4 GiB per copy. Here the rows are processed in chunks: the
forward keeps only the per-row log-sum-exp, and the backward recomputes each
chunk's logits to form ``softmax - onehot``, so at most one chunk of float32
logits exists at a time.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ROWS = 4096  # rows of float32 logits alive at once (the memory estimate uses it too)


def _chunks(n: int, size: int) -> range:
    return range(0, n, size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in _chunks(hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            y = labels[s:s + chunk]
            keep = y != IGNORE_INDEX
            picked = logits.gather(1, y.clamp(min=0)[:, None])[:, 0]
            total += ((lse[s:s + chunk] - picked) * keep).sum()
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in _chunks(hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            y = labels[s:s + chunk]
            keep = (y != IGNORE_INDEX).float()[:, None]
            probs = torch.exp((h @ weight.t()).float() - lse[s:s + chunk, None])
            probs.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(probs[:, :1]))
            g = (probs * keep * grad_out).to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK_ROWS
) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    Args:
        hidden: ``[tokens, hidden]`` final hidden states (any float dtype).
        weight: ``[vocab, hidden]`` output-head weight.
        labels: ``[tokens]`` targets, ``-100`` where ignored.
        chunk: rows per step; the float32 logits of one chunk are the peak.

    Returns:
        A float32 scalar: the sum over non-ignored rows (divide by their count
        for the mean).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [tokens, dim] and labels [tokens], got {tuple(hidden.shape)} "
                         f"and {tuple(labels.shape)}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight.to(hidden.dtype), labels, chunk)
