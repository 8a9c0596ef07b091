"""Triton fused 4-bit GEMV for decoding: ``y = x @ dequant(W)^T`` with x of 1 to 4 rows.

At batch 1 a linear layer is a matrix-vector product: two flops a weight, so
its time is the time to read the weight. Dequantizing to bf16 first
(:mod:`.triton_dequant` then a bf16 GEMV) reads 0.5 bytes a weight, writes 2
and reads 2 again; this kernel reads the 0.5 packed bytes once and never
writes a weight. Three visible steps: ``_gemv_4bit_kernel`` (Triton) ->
:func:`gemv_4bit` (host launcher: tile choice, split-K) -> ``Linear4bit.forward``
(dispatch for inference with at most 4 input rows).

Each program owns ``BLOCK_N`` output rows and walks K in chunks of ``BLOCK_K``
weights. A chunk is a ``[BLOCK_N, BLOCK_K // GROUP, GROUP // 2]`` tile of
packed bytes, contiguous along the last axis (16-byte loads); ``GROUP`` weights
share one absmax, decoded in registers as in :mod:`.triton_dequant`::

    absmax  = dynamic[absmax_code] * nested_absmax[block // 256] + offset
    partial = sum_group(table[high] * x[2i] + table[low] * x[2i + 1])
    acc    += sum(partial * absmax)                        (float32)

Scaling once per group instead of once per weight saves a multiply a weight;
the result equals the float32 reference up to float32 summation order.
With few row tiles for the machine (small N), K is split across programs
(``SPLIT_K``) that write float32 partial sums, added by one reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant_state import QuantState
from .triton_dequant import _log2, available, kernel_tables, triton

if triton is not None:
    import triton.language as tl

__all__ = ["GemvConfig", "MAX_ROWS", "available", "choose_config", "gemv_4bit", "supports"]

MAX_ROWS = 4  # decode batch sizes; beyond this a dequantize + GEMM reads the weight no more often
_GROUP = 64  # weights per absmax decode (the blocksize when it is smaller)
_TILE_WEIGHTS = 8192  # BLOCK_N * BLOCK_K: 4 KiB of packed bytes per program per iteration
_SMS_FALLBACK = 132  # H100 SXM, for the interpreter


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: rows per program, weights per K-step, K splits, warps."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


if triton is not None:

    @triton.jit
    def _gemv_4bit_kernel(
        x_ptr, packed_ptr, absmax_ptr, code_ptr,
        nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
        N, K, k_per_split, stride_xm, stride_om, stride_os,
        M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_SHIFT: tl.constexpr, NESTED_SHIFT: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        row_byte = rows.to(tl.int64) * (K // 2)  # each row's first byte (K is even)
        groups = tl.arange(0, BLOCK_K // GROUP)
        pair = tl.arange(0, GROUP // 2)
        m_idx = tl.arange(0, M_PAD)
        if DOUBLE_QUANT:
            offset = tl.load(offset_ptr)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
        acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
        for step in range(0, tl.cdiv(k_end - k_begin, BLOCK_K)):
            k_group = k_begin + step * BLOCK_K + groups * GROUP  # [G]: first weight of each group
            group_ok = k_group < k_end
            tile_ok = row_ok[:, None] & group_ok[None, :]  # [BN, G]
            # Each group's bytes start GROUP/2-aligned (K is a multiple of GROUP): the
            # hint lets the compiler issue 16-byte loads along the last axis.
            group_byte = tl.multiple_of(row_byte[:, None] + k_group[None, :] // 2, [GROUP // 2, GROUP // 2])
            byte_idx = group_byte[:, :, None] + pair[None, None, :]  # [BN, G, GROUP/2]
            byte = tl.load(packed_ptr + byte_idx, mask=tile_ok[:, :, None], other=0).to(tl.int32)
            high = tl.load(code_ptr + (byte >> 4))  # weight 2i (first element in the high nibble)
            low = tl.load(code_ptr + (byte & 0xF))  # weight 2i + 1

            block = (group_byte * 2) >> BLOCK_SHIFT  # a group never straddles two blocks
            if DOUBLE_QUANT:
                code8 = tl.load(absmax_ptr + block, mask=tile_ok, other=0).to(tl.int32)
                nested = tl.load(nested_absmax_ptr + (block >> NESTED_SHIFT), mask=tile_ok, other=0.0)
                absmax = tl.load(nested_code_ptr + code8) * nested + offset
                absmax = tl.where(tile_ok, absmax, 0.0)
            else:
                absmax = tl.load(absmax_ptr + block, mask=tile_ok, other=0.0)

            x_idx = k_group[:, None] + 2 * pair[None, :]  # [G, GROUP/2]
            for m in tl.static_range(M):
                x_even = tl.load(x_ptr + m * stride_xm + x_idx, mask=group_ok[:, None], other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + m * stride_xm + x_idx + 1, mask=group_ok[:, None], other=0.0).to(tl.float32)
                part = tl.sum(high * x_even[None, :, :] + low * x_odd[None, :, :], axis=2)  # [BN, G]
                part = tl.sum(part * absmax, axis=1)  # [BN]
                acc = tl.where(m_idx[None, :] == m, acc + part[:, None], acc)

        out_base = out_ptr + pid_k * stride_os
        for m in tl.static_range(M):
            y = tl.sum(tl.where(m_idx[None, :] == m, acc, 0.0), axis=1)
            tl.store(out_base + m * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)


def supports(in_features: int, blocksize: int) -> bool:
    """Whether the kernel takes this layout: every group of ``min(blocksize, 64)``
    weights must lie inside one row and one absmax block, so K is a multiple of it."""
    return in_features % min(blocksize, _GROUP) == 0


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS_FALLBACK


def choose_config(n: int, k: int, device: torch.device) -> GemvConfig:
    """Bandwidth first: 16 rows a program for large N; fewer rows (and longer
    K-steps) while there are fewer row tiles than SMs; split K only if even
    4-row tiles leave SMs idle, since splitting costs a second launch."""
    sms = _sm_count(device)
    block_n = 16
    while block_n > 4 and triton.cdiv(n, block_n) < sms:
        block_n //= 2
    block_k = max(_GROUP, min(_TILE_WEIGHTS // block_n, triton.next_power_of_2(k)))
    tiles = triton.cdiv(n, block_n)
    split_k = 1
    if tiles < sms:
        split_k = max(1, min(triton.cdiv(2 * sms, tiles), k // block_k))
    return GemvConfig(block_n, block_k, split_k)


def gemv_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    state: QuantState,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``x @ dequant(packed, state)^T (+ bias)`` in ``x.dtype``, for ``x`` of shape
    ``[..., K]`` with at most :data:`MAX_ROWS` rows once flattened.

    ``config`` overrides :func:`choose_config` (tests use it to reach split-K and
    small tiles at small sizes; benchmarks to compare tilings).
    """
    if triton is None:
        raise RuntimeError("the Triton GEMV needs the triton package")
    n, k = state.shape
    blocksize = state.blocksize
    if not supports(k, blocksize):
        raise ValueError(f"K={k} is not a multiple of min(blocksize, {_GROUP}) = {min(blocksize, _GROUP)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv_4bit takes 1 to {MAX_ROWS} rows, got {m}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    device = x2.device
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    code, absmax, nested_absmax, nested_code, offset, nested_shift = kernel_tables(state, device)

    cfg = config or choose_config(n, k, device)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
    grid = (triton.cdiv(n, cfg.block_n), split_k)
    _gemv_4bit_kernel[grid](
        x2, flat, absmax, code, nested_absmax, nested_code, offset, out,
        n, k, k_per_split, x2.stride(0), n, m * n,
        M=m, M_PAD=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP=min(blocksize, _GROUP), BLOCK_SHIFT=_log2(blocksize), NESTED_SHIFT=nested_shift,
        DOUBLE_QUANT=state.nested is not None, num_warps=cfg.num_warps,
    )
    if split_k > 1:
        out = out.sum(0).to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)
