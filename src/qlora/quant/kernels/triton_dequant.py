"""Triton 4-bit dequantizer: one launch from packed bytes to bf16/fp16/fp32.

bitsandbytes decodes a double-quantized weight in two launches (8-bit absmax,
then 4-bit values) with the float32 absmax vector written to and read back
from memory in between. Here each program decodes the absmax it needs in
registers:

    absmax = dynamic[absmax_code] * nested_absmax[block // 256] + offset
    out    = table[nibble] * absmax          (float32, rounded once to dtype)

Bit-identical to :mod:`qlora.quant.kernels.torch_ref`: every step is one
float32 operation in the same order, and fused multiply-add is switched off so
the compiler cannot merge the multiply and the add of the absmax decoding.
"""

from __future__ import annotations

import os

import torch

from ..quant_state import QuantState

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: CUDA tensors fall back to the reference.
    triton = None

_BYTES_PER_PROGRAM = 1024  # 2048 outputs a program


def available() -> bool:
    """Triton is importable and it can run: on a CUDA device, or in its CPU
    interpreter (``TRITON_INTERPRET=1``, used to test the kernel without a GPU)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _to_bfloat16_rne(x):
        # float32 -> bfloat16, round to nearest even, in integer arithmetic: the
        # GPU's conversion does the same, but Triton's CPU interpreter truncates,
        # and spelling it out lets the interpreted tests check this exact code.
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _dequant_kernel(
        packed_ptr, absmax_ptr, code_ptr, out_ptr,
        nested_absmax_ptr, nested_code_ptr, offset_ptr,
        n_bytes, n_out,
        BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr, BYTES: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        byte_idx = pid * BYTES + tl.arange(0, BYTES)
        in_range = byte_idx < n_bytes
        byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0).to(tl.int32)

        # Both nibbles of a byte lie in the same block (blocksizes are even).
        block = (byte_idx * 2) >> BLOCK_SHIFT
        if DOUBLE_QUANT:
            absmax_code = tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + (block >> NESTED_SHIFT), mask=in_range, other=0.0)
            scaled = tl.load(nested_code_ptr + absmax_code) * nested
            absmax = scaled + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=in_range, other=0.0)

        high = tl.load(code_ptr + (byte >> 4)) * absmax  # first element of the pair
        low = tl.load(code_ptr + (byte & 0xF)) * absmax
        out_idx = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        values = tl.interleave(high, low)
        if out_ptr.dtype.element_ty == tl.bfloat16:
            values = _to_bfloat16_rne(values)
        else:
            values = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_idx, values, mask=out_idx < n_out)


def _log2(blocksize: int) -> int:
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two, got {blocksize}")
    return blocksize.bit_length() - 1


def kernel_tables(state: QuantState, device: torch.device) -> tuple:
    """``(code, absmax, nested_absmax, nested_code, offset, nested_shift)`` as the 4-bit kernels read them.

    The kernels index every table as a dense vector: a strided view (a slice of a
    bigger buffer, a transposed load) would be read at the wrong places, hence
    ``contiguous``. Without double quantization the nested tables are unused
    placeholders (``DOUBLE_QUANT`` is False).
    """
    code = state.code.to(device=device, dtype=torch.float32).contiguous()
    if state.nested is None:
        absmax = state.absmax.to(device=device, dtype=torch.float32).contiguous()
        return code, absmax, absmax, absmax, absmax, 0
    assert state.offset is not None
    return (code, state.absmax.to(device).contiguous(),
            state.nested.absmax.to(device=device, dtype=torch.float32).contiguous(),
            state.nested.code.to(device=device, dtype=torch.float32).contiguous(),
            state.offset.to(device=device, dtype=torch.float32).reshape(1), _log2(state.nested.blocksize))


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """Decode ``packed`` (uint8, bitsandbytes' layout) to ``state.shape`` in ``dtype``."""
    if triton is None:
        raise RuntimeError("the Triton dequantizer needs the triton package")
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    device = flat.device
    n_out = state.shape.numel()
    out = torch.empty(n_out, dtype=dtype, device=device)
    if n_out == 0:
        return out.reshape(state.shape)
    code, absmax, nested_absmax, nested_code, offset, nested_shift = kernel_tables(state, device)
    n_bytes = flat.numel()
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    _dequant_kernel[grid](
        flat, absmax, code, out, nested_absmax, nested_code, offset, n_bytes, n_out,
        BLOCK_SHIFT=_log2(state.blocksize), NESTED_SHIFT=nested_shift,
        DOUBLE_QUANT=state.nested is not None, BYTES=_BYTES_PER_PROGRAM,
        enable_fp_fusion=False,
    )
    return out.reshape(state.shape)
