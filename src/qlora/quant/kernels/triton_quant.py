"""Triton quantizers: a whole tensor to 4-bit codes, or to 8-bit dynamic codes,
in one launch each.

The PyTorch reference spends a dozen launches per chunk of the tensor; on a GPU
those launches, not memory traffic, set the time (about 3,300 for a 4096x4096
weight in 64K-element chunks, millions for a 70B quantize-on-load). Here each
program quantizes ``BLOCKS`` whole absmax blocks held in registers:

    absmax = max |x|                       (over the block; subnormals flush to zero)
    s      = x * rcp(absmax)               (flushed to zero when subnormal)
    code   = bitsandbytes' CUDA decision tree on s       (4-bit)
           | its 7-step binary search over the code      (8-bit)

which are the steps of bitsandbytes' CUDA kernel ``kQuantizeBlockwise``,
built with ``--use_fast_math``: on a GPU ``rcp`` is the same approximate
reciprocal instruction (``rcp.approx.ftz.f32``), so the bytes are
bitsandbytes' CUDA bytes. Triton's CPU interpreter cannot run PTX; there the
reciprocal is correctly rounded, equal to :func:`torch_ref._codes_cuda`.
A block holding a NaN or an infinity gets a NaN absmax so the caller can
report it.
"""

from __future__ import annotations

import os

import torch

from .triton_dequant import _log2, available, triton

if triton is not None:
    import triton.language as tl

__all__ = ["available", "quantize_4bit", "quantize_blockwise"]

_ELEMENTS_PER_PROGRAM = 4096


def _approx_rcp() -> bool:
    # The interpreter executes with NumPy and cannot run inline PTX.
    return os.environ.get("TRITON_INTERPRET") != "1"


if triton is not None:
    _FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32

    @triton.jit
    def _rcp(x, APPROX: tl.constexpr):
        if APPROX:
            return tl.inline_asm_elementwise(
                "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _flush(x):
        return tl.where(tl.abs(x) < _FLT_MIN, 0.0, x)

    @triton.jit
    def _load_blocks(x_ptr, n, BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, APPROX: tl.constexpr):
        """Load this program's blocks; return (block ids, scaled values, absmax)."""
        blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        x = _flush(tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32))
        # x - x is 0 for every finite x and NaN for NaN and +-inf, so a row's sum of it is its NaN absmax. (A NaN
        # global constant would not do: Triton compares globals with ==, and NaN never equals itself, so it would
        # refuse to launch the compiled kernel, "Global variable _NAN has changed".)
        zero_or_nan = x - x
        nonfinite = tl.max((zero_or_nan != 0).to(tl.int32), axis=1) > 0
        absmax = tl.where(nonfinite, tl.sum(zero_or_nan, axis=1), tl.max(tl.abs(x), axis=1))
        scaled = _flush(x * _rcp(absmax, APPROX)[:, None])
        return blk, scaled, absmax

    @triton.jit
    def _quantize_4bit_kernel(
        x_ptr, packed_ptr, absmax_ptr, n,
        BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, NF4: tl.constexpr, APPROX: tl.constexpr,
    ):
        blk, s, absmax = _load_blocks(x_ptr, n, BLOCKSIZE, BLOCKS, APPROX)
        # bitsandbytes' trees are binary searches, so the code is the count of
        # thresholds exceeded (NaN exceeds none and gets code 0, as there).
        if NF4:
            code = ((s > -0.8480964004993439).to(tl.int32) + (s > -0.6106329262256622).to(tl.int32)
                    + (s > -0.4599952697753906).to(tl.int32) + (s > -0.33967943489551544).to(tl.int32)
                    + (s > -0.23460740596055984).to(tl.int32) + (s > -0.13791173323988914).to(tl.int32)
                    + (s > -0.045525018125772476).to(tl.int32) + (s > 0.03979014977812767).to(tl.int32)
                    + (s > 0.1202552504837513).to(tl.int32) + (s > 0.2035212516784668).to(tl.int32)
                    + (s > 0.2920137718319893).to(tl.int32) + (s > 0.3893125355243683).to(tl.int32)
                    + (s > 0.5016634166240692).to(tl.int32) + (s > 0.6427869200706482).to(tl.int32)
                    + (s > 0.8614784181118011).to(tl.int32))
        else:
            a = tl.abs(s)
            rank = ((a > 0.00260417).to(tl.int32) + (a > 0.0859375).to(tl.int32) + (a > 0.20833333).to(tl.int32)
                    + (a > 0.29166667).to(tl.int32) + (a > 0.4166667).to(tl.int32) + (a > 0.583333).to(tl.int32)
                    + (a > 0.8333333).to(tl.int32))
            code = (rank ^ ((rank & 2) << 1)) | ((s < 0).to(tl.int32) << 3)
        high, low = tl.split(tl.reshape(code, [BLOCKS, BLOCKSIZE // 2, 2]))
        byte_idx = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + byte_idx, ((high << 4) | low).to(tl.uint8), mask=byte_idx < (n + 1) // 2)
        tl.store(absmax_ptr + blk, absmax, mask=blk * BLOCKSIZE < n)

    @triton.jit
    def _quantize_8bit_kernel(
        x_ptr, code_ptr, codes_ptr, absmax_ptr, n,
        BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, APPROX: tl.constexpr,
    ):
        blk, s, absmax = _load_blocks(x_ptr, n, BLOCKSIZE, BLOCKS, APPROX)
        # bitsandbytes' dQuantize: binary search over the 256 sorted code values,
        # then the midpoint to the neighbour crossed decides.
        pivot = tl.full(s.shape, 127, tl.int32)
        upper_pivot = tl.full(s.shape, 255, tl.int32)
        lower_pivot = tl.zeros(s.shape, tl.int32)
        lower = tl.full(s.shape, -1.0, tl.float32)
        upper = tl.full(s.shape, 1.0, tl.float32)
        val = tl.load(code_ptr + pivot)
        for level in tl.static_range(7):
            step = 64 >> level
            right = s > val
            lower_pivot = tl.where(right, pivot, lower_pivot)
            lower = tl.where(right, val, lower)
            upper_pivot = tl.where(right, upper_pivot, pivot)
            upper = tl.where(right, upper, val)
            pivot = tl.where(right, pivot + step, pivot - step)
            val = tl.load(code_ptr + pivot)
        upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
        lower = tl.where(lower_pivot == 0, tl.load(code_ptr), lower)
        above = s > val
        pick_up = above & (s > (upper + val) * 0.5)
        pick_low = (~above) & (s < (lower + val) * 0.5)
        code = tl.where(pick_up, upper_pivot, tl.where(pick_low, lower_pivot, pivot))
        idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(codes_ptr + idx, code.to(tl.uint8), mask=idx < n)
        tl.store(absmax_ptr + blk, absmax, mask=blk * BLOCKSIZE < n)


def _launch_shape(n: int, blocksize: int) -> tuple[int, tuple[int]]:
    blocks = max(1, _ELEMENTS_PER_PROGRAM // blocksize)
    n_blocks = -(-n // blocksize)
    return blocks, (triton.cdiv(n_blocks, blocks),)


def quantize_4bit(x: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed uint8 [ceil(n/2), 1], absmax float32 [n_blocks])`` in one launch,
    as bitsandbytes' CUDA kernel computes them."""
    if triton is None:
        raise RuntimeError("the Triton quantizer needs the triton package")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    if n:
        _log2(blocksize)  # raises unless a power of two
        blocks, grid = _launch_shape(n, blocksize)
        _quantize_4bit_kernel[grid](flat, packed, absmax, n, BLOCKSIZE=blocksize, BLOCKS=blocks,
                                    NF4=quant_type == "nf4", APPROX=_approx_rcp(), enable_fp_fusion=False)
    return packed, absmax


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 codes shaped like x, float32 absmax)`` by bitsandbytes' CUDA 8-bit
    scheme in one launch (``blocksize`` a power of two)."""
    if triton is None:
        raise RuntimeError("the Triton quantizer needs the triton package")
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    if n:
        _log2(blocksize)  # raises unless a power of two
        blocks, grid = _launch_shape(n, blocksize)
        table = code.to(device=x.device, dtype=torch.float32).contiguous()
        _quantize_8bit_kernel[grid](flat, table, codes, absmax, n, BLOCKSIZE=blocksize, BLOCKS=blocks,
                                    APPROX=_approx_rcp(), enable_fp_fusion=False)
    return codes.reshape(x.shape), absmax
