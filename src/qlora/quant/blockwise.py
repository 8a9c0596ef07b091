"""Blockwise absmax quantization to an 8-bit code (the dynamic code).

Used twice in qlora: to compress the 4-bit blocks' absmax constants (double
quantization) and to store Adam's moments in 8 bits. bitsandbytes maps a
normalized value to its code differently per device, and we reproduce each:

- CPU: a 65536-bin lookup table over [-1, 1]. Bin ``i`` holds the index of the
  first code value whose midpoint with its upper neighbour is not below
  ``-1 + 2i/65535``; a value goes to bin ``round((v + 1) / 2 * 65535)``.
  This is not always the nearest code value (values within one bin of a
  midpoint can go either way), which is why a plain nearest search would not
  be bit-exact.
- CUDA: values scaled by ``x * (1 / absmax)`` with subnormals flushed to zero
  (its kernels are built with fast math), then a 7-step binary search over the
  sorted code followed by a comparison with the midpoint to the neighbour that
  was crossed. On CUDA tensors the Triton quantizer
  (:mod:`qlora.quant.kernels.triton_quant`) does it in one launch.

A block holding NaN or an infinity gets a NaN absmax, so the whole block
decodes to NaN: non-finite values propagate (as they would through a 32-bit
optimizer) instead of turning into large finite numbers.

Both share the block layout: the flattened tensor is cut into ``blocksize``
runs (the last may be short), each scaled by its own absmax to [-1, 1].
"""

from __future__ import annotations

import functools

import torch

from .kernels.torch_ref import flush_subnormals

_LUT_BINS = 65536


@functools.lru_cache(maxsize=8)
def _lut_for(code_key: tuple[float, ...]) -> torch.Tensor:
    code = torch.tensor(code_key, dtype=torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_BINS, dtype=torch.float32)) / float(_LUT_BINS - 1)
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)


def _codes_by_lut(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    lut = _lut_for(tuple(code.float().cpu().tolist())).to(scaled.device)
    # Clamped as C's fmin/fmax do, which return the number when the other side is NaN: a block whose
    # absmax is subnormal has an infinite reciprocal (1 / 1e-39 > float32 max), so its values scale
    # to +-inf (clamped to +-1) and its zeros to 0 * inf = NaN, which bitsandbytes codes as -1.
    v = torch.fmin(torch.fmax(scaled, scaled.new_tensor(-1.0)), scaled.new_tensor(1.0))
    # float32 steps in the same order as bitsandbytes: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
    bins = ((v + 1.0) * 0.5 * float(_LUT_BINS - 1) + 0.5).to(torch.int64)
    return lut[bins]


def _codes_by_search(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    code = code.float().to(scaled.device)
    x = scaled
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        right = x > val
        lower_pivot = torch.where(right, pivot, lower_pivot)
        lower = torch.where(right, val, lower)
        upper_pivot = torch.where(right, upper_pivot, pivot)
        upper = torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    pick_up = above & (x > (upper + val) * 0.5)
    pick_low = (~above) & (x < (lower + val) * 0.5)
    out = torch.where(pick_up, upper_pivot, torch.where(pick_low, lower_pivot, pivot))
    return out.to(torch.uint8)


def _use_triton(x: torch.Tensor, blocksize: int) -> bool:
    if x.device.type != "cuda" or blocksize & (blocksize - 1):
        return False
    from .kernels import triton_quant

    return triton_quant.available()


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to 8-bit indices into ``code``, block by block.

    Args:
        x: float tensor of any shape (computed in float32).
        code: 256 sorted float32 values in [-1, 1].
        blocksize: elements per absmax block.

    Returns:
        ``(codes, absmax)``: uint8 codes shaped like ``x`` and the float32
        absmax of each block (``ceil(numel / blocksize)`` values; NaN for a
        block holding NaN or an infinity).

    Raises:
        ValueError: for a non-positive blocksize or a dtype other than
            float32, float16 or bfloat16 (as bitsandbytes).
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"blockwise quantization takes float32, float16 or bfloat16 tensors, got {x.dtype}")
    x = x.detach()  # rounding to a code has no gradient: a parameter is quantized as its values
    if _use_triton(x, blocksize):
        from .kernels import triton_quant

        return triton_quant.quantize_blockwise(x, code, blocksize)
    flat = x.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    padded = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    blocks = padded.view(n_blocks, blocksize)
    if x.device.type == "cuda":
        blocks = flush_subnormals(blocks)
        absmax = blocks.abs().amax(dim=1)
        scaled = flush_subnormals(blocks * torch.reciprocal(absmax)[:, None])
        codes = _codes_by_search(scaled, code)
    else:
        absmax = blocks.abs().amax(dim=1)
        # An all-zero block gets code 0 (bitsandbytes skips it), not NaN; so does a non-finite one.
        skip = ((absmax == 0) | ~torch.isfinite(absmax))[:, None]
        scaled = torch.where(skip, 0.0, blocks * (1.0 / absmax)[:, None])
        codes = torch.where(skip, 0, _codes_by_lut(scaled, code))
    absmax = torch.where(torch.isfinite(absmax), absmax, torch.nan)
    return codes.reshape(-1)[:n].reshape(x.shape), absmax



def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[codes] * absmax`` per block,
    multiplied in float32 and rounded once to ``dtype``."""
    flat = codes.reshape(-1).long()
    n = flat.numel()
    values = code.float().to(codes.device)[flat]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(codes.shape)
