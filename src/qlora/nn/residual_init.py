"""PiSSA and OLoRA: adapters that start as the weight's own principal part.

Both split the base weight ``W = W_res + s * B0 @ A0`` (``s`` the LoRA scale), give
``B0, A0`` to the adapter and leave the residual ``W_res`` in the base, so the
layer computes the same function before training while the adapter starts on the
directions that matter most (PEFT's ``init_lora_weights``):

- PiSSA (Meng et al. 2024): ``W = U S V^T``; ``B0 = U_r sqrt(S_r / s)``,
  ``A0 = sqrt(S_r / s) V_r^T`` from the ``r`` largest singular values.
  ``pissa_niter_K`` takes them from ``torch.svd_lowrank`` (Halko's randomized SVD
  with ``K`` subspace iterations; its random start draws from torch's generator).
- OLoRA (Büyükakyüz 2024): ``W = Q R``; ``B0 = Q[:, :r]``, ``A0 = R[:r]``.

With a 4-bit base the split is made on the 16-bit weight and ``W_res`` is what gets
quantized ("QPiSSA"): the largest components stay exact in the adapter, so the
4-bit layer is closer to ``W`` than a plain quantization of it.
"""

from __future__ import annotations

import torch

from .residual_init_names import PISSA_NITER


@torch.no_grad()
def residual_factors(w: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of ``init`` for the float32 ``[out, in]`` weight ``w``, PEFT's arithmetic step for step.

    Raises:
        ValueError: ``r`` exceeds the weight's rank bound ``min(out, in)``, or an unknown ``init``.
    """
    if r > min(w.shape):
        raise ValueError(f"{init} takes r={r} components of a {w.shape[0]}x{w.shape[1]} weight, which has at most "
                         f"{min(w.shape)}; lower the rank (or exclude this layer)")
    if init == "olora":
        q, upper = torch.linalg.qr(w)
        return upper[:r].contiguous(), q[:, :r].contiguous()
    niter = PISSA_NITER.fullmatch(init)
    if niter:
        u, sigma, v = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        vh = v.t()
    elif init == "pissa":
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        u, sigma, vh = u[:, :r], sigma[:r], vh[:r]
    else:
        raise ValueError(f"unknown residual init {init!r}; use 'pissa', 'pissa_niter_K' or 'olora'")
    root = torch.diag(torch.sqrt(sigma / scaling))
    return root @ vh, u @ root


@torch.no_grad()
def residual_split(w: torch.Tensor, init: str, r: int,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A0, B0, W - s B0 A0)`` of the float32 ``[out, in]`` weight ``w`` (see :func:`residual_factors`)."""
    a, b = residual_factors(w, init, r, scaling)
    return a, b, w - scaling * b @ a


def draw_like_svd_lowrank(out_features: int, in_features: int, r: int, device: torch.device) -> None:
    """Advance torch's generator on ``device`` as ``pissa_niter_K``'s ``torch.svd_lowrank`` of an
    ``[out, in]`` float32 weight does: one normal ``[min(out, in), r]`` draw, its random start. This lets
    a caller that computes the layers' inits in another order give each the state it has in layer order."""
    torch.randn(min(out_features, in_features), r, dtype=torch.float32, device=device)
