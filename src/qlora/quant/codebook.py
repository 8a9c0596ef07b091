"""Code books: the value tables that 4-bit and 8-bit codes index into.

Every table is built to be bit-identical to bitsandbytes' tables, because the
codes we write must decode to the same numbers in their kernels and ours.
"""

from __future__ import annotations

import functools

import torch

# NF4: quantiles of N(0, 1) chosen so that each of the 16 bins holds equal
# probability mass, normalized to [-1, 1], with an exact zero (QLoRA paper,
# appendix E). The values are the float32 numbers bitsandbytes ships.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (bitsandbytes' e2m1 variant, exponent bias 2, no inf/nan), listed by bit
# pattern: bit 3 is the sign, bits 0-2 the magnitude code. Normalized by 12.
# Code 0b1000 decodes to +0.0, not -0.0, exactly as in bitsandbytes' table.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
            0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# Symmetric INT4 (absmax, levels -7..7): only a baseline for error reports.
_INT4_RAW = (7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0)

QUANT_TYPES_4BIT = ("nf4", "fp4")


@functools.lru_cache(maxsize=None)
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        table = torch.tensor(_NF4, dtype=torch.float32)
    elif quant_type == "fp4":
        table = torch.tensor(_FP4_RAW, dtype=torch.float32)
    elif quant_type == "int4":
        table = torch.tensor(_INT4_RAW, dtype=torch.float32)
    else:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; expected one of nf4, fp4 (int4 for comparisons only)")
    return table / table.abs().max()


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type, indexed by the 4-bit code."""
    return _code_4bit_cpu(quant_type).to(device)


@functools.lru_cache(maxsize=None)
def _dynamic_cpu(signed: bool) -> torch.Tensor:
    # The 8-bit "dynamic" code (Dettmers 2016): a sign bit, a run of zero bits
    # giving a decimal exponent 10^-6 .. 10^0, an indicator bit, then a linear
    # fraction in [0.1, 1]. Each exponent level contributes the midpoints of an
    # evenly spaced fraction grid; smaller exponents leave more bits for the
    # fraction. Computed with float32 arithmetic in bitsandbytes' order so the
    # values match theirs bit for bit.
    exponent_bits, total_bits = 7, 8
    value_bits = total_bits - 1
    values: list[float] = []
    for level in range(exponent_bits):
        n_fraction = 2 ** (level + value_bits - exponent_bits + (0 if signed else 1)) + 1
        grid = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + level)
        values += (scale * mids).tolist()
        if signed:
            values += (-scale * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_code(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry sorted dynamic 8-bit table (signed for double quantization
    and Adam's first moment, unsigned for the second moment)."""
    return _dynamic_cpu(signed).to(device)
