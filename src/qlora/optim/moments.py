"""Where Adam's two moments of one run of parameter elements are stored.

A *chunk* is a contiguous run ``[start, stop)`` of a flattened parameter. Its
moments are either 32-bit (``exp_avg``, ``exp_avg_sq``: float32) or 8-bit
(uint8 codes plus one float32 absmax per block of 256 elements). This module
fixes the byte layout of a chunk so that the same state can live in its own
tensors or be packed into a page buffer: float32 arrays first, then codes, each
aligned to :data:`ALIGN` bytes so that ``view(float32)`` is legal.
"""

from __future__ import annotations

import torch

QUANT_BLOCK = 256
ALIGN = 16

KEYS_32BIT = ("exp_avg", "exp_avg_sq")
KEYS_8BIT = ("exp_avg_absmax", "exp_avg_sq_absmax", "exp_avg_codes", "exp_avg_sq_codes")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def specs(numel: int, bits: int) -> list[tuple[str, torch.dtype, int]]:
    """``(key, dtype, numel)`` of each moment tensor of a chunk, in layout order."""
    if bits == 32:
        return [("exp_avg", torch.float32, numel), ("exp_avg_sq", torch.float32, numel)]
    if bits == 8:
        blocks = -(-numel // QUANT_BLOCK)
        return [
            ("exp_avg_absmax", torch.float32, blocks), ("exp_avg_sq_absmax", torch.float32, blocks),
            ("exp_avg_codes", torch.uint8, numel), ("exp_avg_sq_codes", torch.uint8, numel),
        ]
    raise ValueError(f"state bits must be 32 or 8, got {bits}")


def nbytes(numel: int, bits: int) -> int:
    """Bytes a chunk of ``numel`` elements occupies in a page (with alignment)."""
    return sum(_align(n * dtype.itemsize) for _, dtype, n in specs(numel, bits))


def views(buf: torch.Tensor, offset: int, numel: int, bits: int) -> dict[str, torch.Tensor]:
    """The moment tensors of a chunk laid out in uint8 ``buf`` from ``offset``."""
    out = {}
    for key, dtype, n in specs(numel, bits):
        size = n * dtype.itemsize
        out[key] = buf[offset:offset + size].view(dtype)
        offset += _align(size)
    return out


def zeros(numel: int, bits: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh moment tensors of a chunk in their own memory (zero moments)."""
    return {key: torch.zeros(n, dtype=dtype, device=device) for key, dtype, n in specs(numel, bits)}


def elements_fitting(free_bytes: int, remaining: int, bits: int) -> int:
    """How many of ``remaining`` elements fit in ``free_bytes`` as one chunk.

    A chunk that does not finish its parameter holds whole quantization
    blocks, so that chunked 8-bit state quantizes exactly like unchunked state.
    """
    if nbytes(remaining, bits) <= free_bytes:
        return remaining
    unit = QUANT_BLOCK if bits == 8 else 1
    per_unit = 8 if bits == 32 else 2 * QUANT_BLOCK + 8  # bytes per unit, before alignment
    k = min(remaining, free_bytes // per_unit * unit) // unit * unit
    while k > 0 and nbytes(k, bits) > free_bytes:
        k -= unit
    return k
