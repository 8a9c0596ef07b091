"""Reference 4-bit kernels in plain PyTorch (CPU and any device).

These define the numerics every faster kernel is tested against. Their steps
are those of bitsandbytes 0.50's portable implementation, so the bytes agree:

quantize (bitsandbytes' CPU scheme; its CUDA scheme is :func:`_codes_cuda`): per block of the flattened tensor, ``absmax = max |x|``; full blocks
are scaled by ``x * (1 / max(absmax, 1e-38))``, a short last block by
``x / max(absmax, 1e-38)``; the scaled value is clamped to [-1, 1] and given the
code of the nearest table value (a value exactly on a midpoint takes the lower
one); two codes share a byte, the first element in the high nibble.

dequantize: ``table[code] * absmax`` in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch

from ..codebook import code_4bit, cuda_thresholds


@functools.lru_cache(maxsize=None)
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = code_4bit(quant_type)
    order = torch.argsort(code, stable=True)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order.to(torch.uint8)


# Elements per step, a multiple of every block size. In the CPU scheme small
# steps keep the float32 temporaries in cache (quantize-on-load relies on the
# bound to keep peak memory low); in the CUDA scheme (run on a GPU without
# Triton) each step costs about 30 launches, so steps are large (64 MiB of
# float32 a temporary) and a 4096x4096 weight takes one.
_CHUNK = 1 << 16
_CHUNK_CUDA = 1 << 24
_FLT_MIN = torch.finfo(torch.float32).tiny


def quantize_4bit_ref(
    x: torch.Tensor, blocksize: int, quant_type: str, scheme: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(packed uint8 [ceil(n/2), 1], absmax float32 [n_blocks])``.

    ``scheme`` picks whose bytes to reproduce: ``"cpu"`` (bitsandbytes' CPU
    path, see the module docstring) or ``"cuda"`` (its CUDA kernel, see
    :func:`_codes_cuda`); by default the scheme of ``x``'s device. Works
    through the tensor in chunks of whole blocks so that the float32
    temporaries stay bounded whatever the tensor size. A block holding a NaN
    or an infinity gets a non-finite absmax (callers check it).
    """
    if scheme is None:  # int4 (a baseline for error reports) has no CUDA tree: it takes the CPU scheme
        scheme = "cuda" if x.device.type == "cuda" and quant_type in ("nf4", "fp4") else "cpu"
    if scheme not in ("cpu", "cuda"):
        raise ValueError(f"scheme must be 'cpu' or 'cuda', got {scheme!r}")
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    chunk_size = _CHUNK_CUDA if scheme == "cuda" else _CHUNK
    for start in range(0, n, chunk_size):
        chunk = flat[start:start + chunk_size].float()
        if scheme == "cpu":
            q, amax = _codes_cpu(chunk, blocksize, quant_type)
        else:
            q, amax = _codes_cuda(chunk, blocksize, quant_type)
        packed[start // 2:start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
    return packed.unsqueeze(1), absmax


def _codes_cpu(chunk: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU steps: ``x * (1 / max(absmax, 1e-38))`` for full
    blocks, a division for a short last block, clamp, nearest table value
    (a midpoint goes to the lower one)."""
    mids, order = _bounds(quant_type)
    mids, order = mids.to(chunk.device), order.to(chunk.device)
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
    return order[torch.bucketize(scaled.nan_to_num(0.0), mids, out_int32=True)], amax


def flush_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Subnormal float32 values to zero, as CUDA code built with fast math treats them."""
    return torch.where(x.abs() < _FLT_MIN, 0.0, x)


def _codes_cuda(chunk: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CUDA kernel (``kQuantizeBlockwise``, built with fast math):
    subnormals flush to zero; ``s = x * (1 / absmax)`` (an all-zero block gives
    NaN, hence code 0); then the decision tree of
    :data:`qlora.quant.codebook.NF4_CUDA_THRESHOLDS` / ``FP4_CUDA_THRESHOLDS``.
    The padding of a short last block is zero, as in the kernel's loads.

    The kernel's reciprocal is the GPU's approximate one (at most 1 ulp off);
    here it is correctly rounded. The Triton quantizer uses the GPU instruction.
    """
    m = chunk.numel()
    padded = torch.nn.functional.pad(chunk, (0, -m % blocksize))
    blocks = flush_subnormals(padded.view(-1, blocksize))
    amax = blocks.abs().amax(dim=1)
    scaled = flush_subnormals(blocks * torch.reciprocal(amax)[:, None]).reshape(-1)[: m + m % 2]
    return tree_codes_cuda(scaled, quant_type), amax


def tree_codes_cuda(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' CUDA decision tree on normalized values (uint8 codes; NaN -> 0)."""
    # The tree is a binary search, so a value's code is the count of thresholds
    # it exceeds (NaN exceeds none); counted one threshold at a time to keep
    # the temporaries one byte a value.
    thresholds = cuda_thresholds(quant_type).tolist()
    values = scaled if quant_type == "nf4" else scaled.abs()
    rank = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for t in thresholds:
        rank += values > t
    if quant_type == "nf4":
        return rank
    return (rank ^ ((rank & 2) << 1)) | ((scaled < 0).to(torch.uint8) << 3)


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
