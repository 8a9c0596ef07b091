"""Reference 4-bit kernels in plain PyTorch (CPU and any device).

These define the numerics every faster kernel is tested against. Their steps
are those of bitsandbytes 0.50's portable implementation, so the bytes agree:

quantize: per block of the flattened tensor, ``absmax = max |x|``; full blocks
are scaled by ``x * (1 / max(absmax, 1e-38))``, a short last block by
``x / max(absmax, 1e-38)``; the scaled value is clamped to [-1, 1] and given the
code of the nearest table value (a value exactly on a midpoint takes the lower
one); two codes share a byte, the first element in the high nibble.

dequantize: ``table[code] * absmax`` in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch

from ..codebook import code_4bit


@functools.lru_cache(maxsize=None)
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order.to(torch.uint8)


_CHUNK = 1 << 16  # elements per step: a multiple of every block size, bounds temporary memory


def quantize_4bit_ref(
    x: torch.Tensor, blocksize: int, quant_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(packed uint8 [ceil(n/2), 1], absmax float32 [n_blocks])``.

    Works through the tensor in chunks of whole blocks so that the float32
    temporaries stay small whatever the tensor size (quantize-on-load relies
    on this to keep peak memory low).
    """
    mids, order = _bounds(quant_type)
    mids, order = mids.to(x.device), order.to(x.device)
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    for start in range(0, n, _CHUNK):
        chunk = flat[start:start + _CHUNK].float()
        m = chunk.numel()
        rem = m % blocksize
        full = m - rem
        body = chunk[:full].view(-1, blocksize)
        amax = body.abs().amax(dim=1)
        scaled = (body * (1.0 / amax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
        if rem:  # only the last chunk can end in a short block
            tail_max = chunk[full:].abs().max().clamp(min=1e-38)
            amax = torch.cat([amax, tail_max[None]])
            scaled = torch.cat([scaled, (chunk[full:] / tail_max).clamp(-1, 1)])
        if m % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = order[torch.bucketize(scaled, mids, out_int32=True)]
        packed[start // 2:start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
    return packed.unsqueeze(1), absmax


@functools.lru_cache(maxsize=None)
def _byte_table(quant_type: str) -> torch.Tensor:
    # Both decoded values of each of the 256 bytes, (high, low) as one 64-bit
    # entry: a single 1-D gather decodes a byte, the fastest lookup torch has.
    code = code_4bit(quant_type)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


_CHUNK_BYTES = 1 << 21  # keeps each step's temporaries in cache-sized pieces


def dequantize_4bit_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``absmax`` is the float32 per-block absmax (already decoded if nested)."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    table = _byte_table(quant_type).to(flat.device)
    n = shape.numel()
    out = torch.empty(n, dtype=dtype, device=flat.device)
    full = n - n % blocksize  # even: both nibbles of a byte share a block
    for start in range(0, full // 2, _CHUNK_BYTES):
        stop = min(start + _CHUNK_BYTES, full // 2)
        values = torch.take(table, flat[start:stop].long()).view(torch.float32).view(-1, blocksize)
        scale = absmax[2 * start // blocksize: 2 * stop // blocksize, None]
        # float32 product, rounded once to dtype on store.
        torch.mul(values, scale, out=out[2 * start: 2 * stop].view(-1, blocksize))
    if full < n:
        values = torch.take(table, flat[full // 2:].long()).view(torch.float32)[: n - full]
        torch.mul(values, absmax[-1], out=out[full:])
    return out.reshape(shape)
