"""LoftQ (Li et al. 2023): choose the 4-bit base and the adapter together.

Instead of leaving the whole quantization error to training, the base Q and the
factors A, B are picked so that ``dequant(Q) + s B A`` approximates the
full-precision W: alternate ``Q = quant(W - s B A)`` and
``s B A = SVD_r(W - dequant(Q))``. The adapter is then valid on that base only.
"""

from __future__ import annotations

import math

import torch

from .linear4bit import Linear4bit


@torch.no_grad()
def loftq_factors(w: torch.Tensor, quantized: Linear4bit, r: int, scaling: float,
                  iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, Q's input)`` for the float32 ``[out, in]`` weight ``w`` in ``iters`` steps; ``quantized``
    (the 4-bit format of Q) holds Q on return, the quantization of the third tensor returned."""
    residual = quantized_input = w
    for _ in range(iters):
        quantized_input = residual
        quantized.set_weight(quantized_input)
        u, sigma, vh = torch.linalg.svd(w - quantized.dequantize(torch.float32), full_matrices=False)
        root = sigma[:r].sqrt() / math.sqrt(scaling)
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        residual = w - scaling * (b @ a)
    return a, b, quantized_input
