"""Swap a model's RMSNorms and SwiGLU MLPs for the fused Triton modules, and back.

Explicit and per model instance: transformers' classes and functions are never
patched. Each supported module is replaced by a fused one that shares its
parameters (and, for MLPs, its projection modules with their adapters), so
state dicts, adapters and optimizers see the same tensors before and after.
The fused modules run Triton only on CUDA tensors (or under
``TRITON_INTERPRET=1``); elsewhere they compute the transformers formulas.
"""

from __future__ import annotations

from torch import nn

from qlora.nn.fused.rms_norm import GEMMA_STYLE, LLAMA_STYLE, FusedRMSNorm
from qlora.nn.fused.swiglu import LLAMA_MLPS, FusedSwiGLUMLP, is_silu

_FUSED = (FusedRMSNorm, FusedSwiGLUMLP)


def _fused_for(module: nn.Module) -> nn.Module | None:
    name = type(module).__name__
    if name in LLAMA_STYLE | GEMMA_STYLE:
        return FusedRMSNorm.from_module(module)
    if name in LLAMA_MLPS and is_silu(module.act_fn):
        return FusedSwiGLUMLP.from_module(module)
    return None


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_fused_kernels(model: nn.Module) -> list[str]:
    """Replace every supported RMSNorm and SwiGLU MLP of ``model`` in place.

    Returns:
        The dotted paths of the replaced modules (already fused ones are skipped).
    """
    swapped = []
    for path, module in list(model.named_modules()):
        fused = _fused_for(module) if path and not isinstance(module, _FUSED) else None
        if fused is not None:
            _replace(model, path, fused)
            swapped.append(path)
    return swapped


def remove_fused_kernels(model: nn.Module) -> list[str]:
    """Put back the original module objects; returns the restored paths."""
    restored = []
    for path, module in list(model.named_modules()):
        if isinstance(module, _FUSED):
            _replace(model, path, module.original)
            restored.append(path)
    return restored
