"""Fused Triton blocks, each ``kernel -> launcher -> autograd.Function -> nn.Module``,
each with a PyTorch reference path taken where Triton does not run."""

from .rms_norm import FusedRMSNorm, RMSNormFunction, rms_norm_reference
from .swiglu import FusedSwiGLUMLP, SwiGLUFunction, swiglu

__all__ = ["FusedRMSNorm", "FusedSwiGLUMLP", "RMSNormFunction", "SwiGLUFunction", "rms_norm_reference", "swiglu"]
