"""SwiGLU activation in Triton: ``silu(gate) * up`` in one pass each way.

    forward:  h = gate * sigmoid(gate) * up                 (float32, rounded once)
    backward: dgate = dh * up * s * (1 + gate * (1 - s)),  s = sigmoid(gate)
              dup   = dh * gate * s

The plain MLP keeps ``silu(gate)`` for backward besides ``gate`` and ``up``;
here only ``gate`` and ``up`` are saved and the sigmoid is recomputed, saving
one ``[tokens, intermediate]`` tensor per layer (the largest activations of a
Llama layer) and two kernel launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import triton, triton_runs_on

_BLOCK = 1024

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = a * tl.sigmoid(a) * b
        tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        silu = a * s
        tl.store(dgate_ptr + offs, (dh * b * s * (1.0 + a * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + offs, (dh * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=4)
    return out


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(dgate, dup)``."""
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dgate, dup, n, BLOCK=_BLOCK, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Saves only ``gate`` and ``up``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dh.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: the Triton kernels where they run, else PyTorch (as LlamaMLP computes it)."""
    if triton_runs_on(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


# transformers MLP classes that compute down(act(gate(x)) * up(x)) (checked against their source).
LLAMA_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def is_silu(act: nn.Module) -> bool:
    """Whether ``act`` is SiLU (torch's or transformers' class)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class FusedSwiGLUMLP(nn.Module):
    """A LlamaMLP-like block with the activation and product fused.

    The projections are the original module objects (plain, 4-bit or LoRA
    linears), so parameters, adapters and their state-dict keys are unchanged.
    The replaced module is kept, not as a submodule, for
    :func:`qlora.model.fused.remove_fused_kernels`.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    @classmethod
    def from_module(cls, module: nn.Module) -> "FusedSwiGLUMLP":
        """Take ``module``'s projections.

        Raises:
            ValueError: for another MLP class or an activation other than SiLU
                (Gemma's GeGLU uses tanh-approximated GELU).
        """
        name = type(module).__name__
        if name not in LLAMA_MLPS:
            raise ValueError(f"{name}: not a known gate/up/down MLP; supported: {', '.join(sorted(LLAMA_MLPS))}")
        if not is_silu(module.act_fn):
            raise ValueError(f"{name}: activation {type(module.act_fn).__name__} is not SiLU")
        fused = cls(module.gate_proj, module.up_proj, module.down_proj)
        fused.__dict__["original"] = module  # plain attribute: not registered as a child
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
