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

# bitsandbytes' CUDA quantizer does not search the table: it walks a decision
# tree of decimal constants (``dQuantizeNF4`` / ``dQuantizeFP4`` in its
# csrc/kernels.cu), rounded to float32 by the compiler. They are not the
# float32 midpoints of the table (e.g. 0.583333 for FP4's 7/12), so a value
# near a midpoint can get a different code than on the CPU; a CUDA quantizer
# that must agree with bitsandbytes' CUDA bytes compares with these.
#
# NF4: the code is the number of thresholds the value exceeds (strictly).
NF4_CUDA_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
# FP4: the rank of |x| among these (number exceeded, 0..7) names the magnitude
# bits 0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011 (rank ``r`` ->
# ``r ^ ((r & 2) << 1)``); bit 3 is set for every x < 0, so a small negative
# value is 0b1000 (-0), not 0b0000.
FP4_CUDA_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)


def cuda_thresholds(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' CUDA decision constants for ``quant_type`` as float32, ascending."""
    return _table("cuda_tree", quant_type, device)


@functools.lru_cache(maxsize=None)
def _cuda_thresholds_cpu(quant_type: str) -> torch.Tensor:
    table = {"nf4": NF4_CUDA_THRESHOLDS, "fp4": FP4_CUDA_THRESHOLDS}
    if quant_type not in table:
        raise ValueError(f"no CUDA decision tree for quant_type {quant_type!r}")
    return torch.tensor(table[quant_type], dtype=torch.float32)


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


def _device_key(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@functools.lru_cache(maxsize=None)
def _on_device(table: str, key: object, device: torch.device) -> torch.Tensor:
    # One copy per device, made once: a table fetched every optimizer step or
    # every quantize call would otherwise cost a blocking host-to-device copy.
    source = {"4bit": _code_4bit_cpu, "dynamic": _dynamic_cpu, "cuda_tree": _cuda_thresholds_cpu}[table]
    return source(key).to(device)


def _table(table: str, key: object, device: torch.device | str) -> torch.Tensor:
    device = _device_key(device)
    if device.type == "cpu":
        return {"4bit": _code_4bit_cpu, "dynamic": _dynamic_cpu, "cuda_tree": _cuda_thresholds_cpu}[table](key)
    return _on_device(table, key, device)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table of a 4-bit type, indexed by the 4-bit code
    (a shared, cached tensor: clone it before changing it)."""
    return _table("4bit", quant_type, device)


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
    and Adam's first moment, unsigned for the second moment); shared and cached
    per device: clone it before changing it."""
    return _table("dynamic", signed, device)
