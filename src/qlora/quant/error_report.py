"""How much each 4-bit code loses, measured: the check that NF4 earns its place.

NF4's values are quantiles of N(0, 1), so on normally distributed weights (what
pretrained linear layers hold, roughly) it must beat the evenly spaced INT4 and
the exponent-spaced FP4 at equal storage. The heavy-tailed rows (Student-t,
3 degrees of freedom) show how the codes cope with outliers that blow up a
block's absmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fourbit import _quantize, dequantize_4bit
from .quant_state import bits_per_parameter

QUANT_TYPES = ("nf4", "fp4", "int4")
DISTRIBUTIONS = ("normal", "student-t(3)")


@dataclass(frozen=True)
class ErrorRow:
    """One weight distribution under one code; errors are per weight, in the weights' units."""

    weights: str
    quant_type: str
    mse: float
    max_error: float
    mse_double_quant: float
    max_error_double_quant: float
    bits: float
    bits_double_quant: float


def sample_weights(distribution: str, numel: int, generator: torch.Generator) -> torch.Tensor:
    """``numel`` float32 draws of N(0, 1) or of Student's t with 3 degrees of freedom."""
    z = torch.randn(numel, generator=generator)
    if distribution == "normal":
        return z
    if distribution == "student-t(3)":
        chi2_over_df = (torch.randn(3, numel, generator=generator) ** 2).mean(dim=0)
        return z / chi2_over_df.sqrt()
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")


def quant_error_report(numel: int = 1 << 20, blocksize: int = 64, seed: int = 0) -> list[ErrorRow]:
    """Round-trip ``numel`` weights of each distribution through NF4, FP4 and INT4
    (with and without double quantization) and measure the error and storage."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for distribution in DISTRIBUTIONS:
        w = sample_weights(distribution, numel, generator)
        for quant_type in QUANT_TYPES:
            stats: dict[bool, tuple[float, float, float]] = {}
            for double_quant in (False, True):
                packed, state = _quantize(w, quant_type, blocksize, double_quant)
                err = (dequantize_4bit(packed, state) - w).double()
                stats[double_quant] = (err.square().mean().item(), err.abs().max().item(), bits_per_parameter(state))
            rows.append(ErrorRow(distribution, quant_type, stats[False][0], stats[False][1],
                                 stats[True][0], stats[True][1], stats[False][2], stats[True][2]))
    return rows
