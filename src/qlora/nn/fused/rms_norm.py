"""RMSNorm in Triton: one pass forward, one pass backward, float32 inside.

    rstd = 1 / sqrt(mean(x^2) + eps)            (per row, float32, saved)
    llama:  y = w * to_dtype(x * rstd)           (LlamaRMSNorm, Mistral, Qwen2/3, Phi3)
    gemma:  y = to_dtype(x * rstd * (1 + w))     (GemmaRMSNorm, Gemma2/3)

The backward with ``g = dy * w`` (gemma: ``dy * (1 + w)``) and ``xhat = x * rstd``:

    dx = rstd * (g - xhat * mean(g * xhat))
    dw = sum over rows of dy * xhat

In QLoRA the norm weights are frozen, so ``dw`` (a reduction over every row)
is computed only when the weight requires a gradient. The transformers modules
save the float32 copy of ``x`` and several temporaries for backward; here only
``x`` and one float32 per row are kept.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import program_count, triton, triton_runs_on

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rms_norm_forward_kernel(
        x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
        GEMMA: tl.constexpr, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(rstd_ptr + row, rstd)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        xhat = x * rstd
        if GEMMA:
            y = xhat * (1.0 + w)
        else:  # round to the input dtype before the weight, as LlamaRMSNorm does
            y = xhat.to(x_ptr.dtype.element_ty).to(tl.float32) * w
        tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, n_cols,
        GEMMA: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # A persistent grid: each program walks rows pid, pid + programs, ... so
        # that the weight gradient needs one partial sum per program, not per row.
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            w = w + 1.0
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for row in range(pid, n_rows, programs):
            offs = tl.cast(row, tl.int64) * n_cols + cols
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            g = dy * w
            dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:
                if GEMMA:
                    dw += dy * xhat
                else:
                    dw += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
        if WEIGHT_GRAD:
            tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _block(n_cols: int) -> tuple[int, int]:
    """The power-of-two row tile and the warps to cover it."""
    block = triton.next_power_of_2(n_cols)
    if block * 4 > 65536:  # one row must fit a program's registers
        raise ValueError(f"rms_norm: rows of {n_cols} elements are too long for one Triton program")
    return block, min(max(block // 256, 1), 16)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on a contiguous ``[rows, n]`` ``x``; returns ``(y, rstd)``."""
    n_rows, n_cols = x.shape
    out_dtype = x.dtype if gemma else torch.result_type(weight, x)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block, warps = _block(n_cols)
    if n_rows:
        _rms_norm_forward_kernel[(n_rows,)](x, weight, y, rstd, n_cols, eps,
                                            GEMMA=gemma, BLOCK=block, num_warps=warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, gemma: bool,
                      weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernel; returns ``(dx, dw)``, ``dw`` None unless ``weight_grad``."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    programs = max(1, min(n_rows, program_count(x.device)))
    dw_partial = torch.empty((programs, n_cols) if weight_grad else (1,), dtype=torch.float32, device=x.device)
    block, warps = _block(n_cols)
    if n_rows:
        _rms_norm_backward_kernel[(programs,)](dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols,
                                               GEMMA=gemma, WEIGHT_GRAD=weight_grad, BLOCK=block, num_warps=warps)
    if not weight_grad:
        return dx, None
    dw = dw_partial.sum(0) if n_rows else torch.zeros(n_cols, dtype=torch.float32, device=x.device)
    return dx, dw.to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Saves ``x`` and the per-row ``rstd``; recomputes ``xhat`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y, rstd = rms_norm_forward(x2, weight.contiguous(), eps, gemma)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw = rms_norm_backward(dy2, x2, weight.contiguous(), rstd, ctx.gemma, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """The transformers formulas, operation for operation (the CPU path)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).type_as(x)
    return weight * h.to(x.dtype)


# transformers RMSNorm classes by formula (checked against their source).
LLAMA_STYLE = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
GEMMA_STYLE = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


class FusedRMSNorm(nn.Module):
    """A drop-in for a transformers RMSNorm that shares its weight.

    The replaced module is kept (not as a submodule, so no parameter or state
    dict key appears twice) for :func:`qlora.model.fused.remove_fused_kernels`.
    """

    def __init__(self, weight: nn.Parameter, eps: float, gemma: bool) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.gemma = gemma

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedRMSNorm":
        """Wrap ``module``'s weight and epsilon.

        Raises:
            ValueError: for a class whose formula is not one of the two above
                (e.g. Gemma3n's optional scale, Olmo's norm after the weight).
        """
        name = type(module).__name__
        if name not in LLAMA_STYLE | GEMMA_STYLE:
            raise ValueError(f"{name}: not a known RMSNorm formula; supported: "
                             f"{', '.join(sorted(LLAMA_STYLE | GEMMA_STYLE))}")
        eps = getattr(module, "variance_epsilon", None)
        fused = cls(module.weight, float(module.eps if eps is None else eps), name in GEMMA_STYLE)
        fused.__dict__["original"] = module  # plain attribute: not registered as a child
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_runs_on(x):
            return RMSNormFunction.apply(x, self.weight, self.eps, self.gemma)
        return rms_norm_reference(x, self.weight, self.eps, self.gemma)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, {'gemma' if self.gemma else 'llama'}"
