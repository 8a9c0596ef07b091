"""Public 4-bit API: ``quantize_4bit`` / ``dequantize_4bit``.

Dispatch: CUDA tensors use the Triton kernels when Triton is importable (one
launch quantizes, bitsandbytes' CUDA bytes; one launch decodes the
double-quantized absmax, looks up the code and scales); large CPU tensors decode
with the compiled reference (:mod:`qlora.quant.kernels.compiled_cpu`, same
bits, one fused loop); everything else uses
:mod:`qlora.quant.kernels.torch_ref`, the reference, whose bytes are
bitsandbytes' CPU bytes on the CPU and its CUDA bytes on CUDA.
"""

from __future__ import annotations

import torch

from .blocksizes import BLOCKSIZES
from .codebook import QUANT_TYPES_4BIT, code_4bit
from .double_quant import block_absmax, compress_absmax, decompress_absmax
from .kernels import compiled_cpu, torch_ref
from .quant_state import QuantState

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(quant_type: str, blocksize: int, dtype: torch.dtype) -> None:
    if quant_type not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"4-bit quantization takes float32, float16 or bfloat16 tensors, got {dtype}")


def quantize_4bit(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` blockwise to 4 bits.

    Args:
        w: float32/float16/bfloat16 tensor of any shape.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: elements per absmax block (32 ... 4096, powers of two).
        double_quant: also quantize the block absmax to 8 bits.

    Returns:
        ``(packed, state)`` with ``packed`` uint8 of shape ``[ceil(numel/2), 1]``
        (bitsandbytes' layout) and the :class:`QuantState` to decode it.

    Raises:
        ValueError: for an unknown type, blocksize or dtype, a ``meta`` tensor (it has no values), or when ``w``
            holds NaN or infinite values (4 bits cannot store them; the
            message says how many blocks and where the first one starts).
    """
    _check(quant_type, blocksize, w.dtype)
    if w.is_meta:
        raise ValueError(f"cannot quantize a {tuple(w.shape)} tensor on the meta device: it has no values; "
                         "materialize it (load its weights) first.")
    # Rounding to 4 bits has no gradient: a trained weight (an nn.Parameter) is quantized as its values.
    return _quantize(w.detach(), quant_type, blocksize, double_quant)


class NonFiniteError(ValueError):
    """A tensor to quantize holds NaN or infinite values (or, with double quantization, values so
    close to float32's maximum that their decoded block constants would overflow)."""


def _check_finite(absmax: torch.Tensor, blocksize: int, shape: torch.Size) -> None:
    bad = ~torch.isfinite(absmax)
    if bool(bad.any()):
        first = int(bad.nonzero()[0]) * blocksize
        raise NonFiniteError(
            f"cannot quantize a {tuple(shape)} tensor holding NaN or infinite values: {int(bad.sum())} of its "
            f"{absmax.numel()} blocks of {blocksize} do, the first starting at flat element {first}. "
            "Check the checkpoint (or the merge that produced the weight) for overflow.")


def _quantize(
    w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, QuantState]:
    # Unchecked, so the error report can also run the int4 baseline through it.
    if _use_triton_quantize(w, quant_type):
        from .kernels import triton_quant

        packed, absmax = triton_quant.quantize_4bit(w, blocksize, quant_type)
    else:
        packed, absmax = torch_ref.quantize_4bit_ref(w, blocksize, quant_type)
    _check_finite(absmax, blocksize, w.shape)
    state = QuantState(
        absmax=absmax, shape=w.shape, code=code_4bit(quant_type, w.device).clone(), blocksize=blocksize,
        quant_type=quant_type, dtype=w.dtype,
    )
    if double_quant:
        state.absmax, state.offset, state.nested = compress_absmax(absmax)
        _check_decodable(state, absmax, w.shape)
    return packed, state


def _check_decodable(state: QuantState, absmax: torch.Tensor, shape: torch.Size) -> None:
    # The 8-bit code of a constant can round up, so a constant within ~1e-4 of float32's maximum can decode
    # (code * nested absmax + offset) to infinity when the offset is that large too, which only happens where
    # bitsandbytes' float32 mean overflowed (see compress_absmax; it decodes all to NaN there). Refused: a
    # block of inf/NaN would be silent corruption, and without double quantization the weights quantize fine.
    assert state.offset is not None and state.nested is not None
    if bool(torch.isfinite(decompress_absmax(state.absmax, state.offset, state.nested)).all()):
        return
    raise NonFiniteError(
        f"cannot double-quantize a {tuple(shape)} tensor whose largest magnitude, {absmax.max().item():.4g}, is "
        "this close to float32's maximum: its block constants would decode to infinity. Quantize it without "
        "double quantization (--no-double-quant, double_quant=False), or check the checkpoint for overflow.")


def _use_triton_quantize(w: torch.Tensor, quant_type: str) -> bool:
    if w.device.type != "cuda" or quant_type not in QUANT_TYPES_4BIT:
        return False
    from .kernels import triton_quant

    return triton_quant.available()


def stored_sizes(packed: torch.Tensor, state: QuantState) -> dict[str, tuple[int, int]]:
    """``(held, needed)`` element counts of ``packed``'s bytes (``"packed"``), the block constants (``"absmax"``)
    and, double-quantized, theirs (``"nested_absmax"``) for a tensor of ``state.shape``: unequal where the two do
    not come from one :func:`quantize_4bit` call."""
    n = state.shape.numel()
    blocks = -(-n // state.blocksize)
    sizes = {"packed": (packed.numel() * packed.element_size(), (n + 1) // 2),
             "absmax": (state.absmax.numel(), blocks)}
    if state.nested is not None:
        sizes["nested_absmax"] = (state.nested.absmax.numel(), -(-blocks // state.nested.blocksize))
    return sizes


def _check_fits(packed: torch.Tensor, state: QuantState) -> None:
    """``packed`` and ``state`` come from one :func:`quantize_4bit` call: a pair of two calls would decode
    another tensor's codes with this one's scales (or read past its bytes)."""
    labels = {"packed": "packed bytes", "absmax": "block constants (absmax)"}
    wrong = [f"{labels[key]}: {got}, not {want}" for key, (got, want) in stored_sizes(packed, state).items()
             if key in labels and got != want]
    if wrong:
        raise ValueError(f"packed data and quantization state do not belong together: a {tuple(state.shape)} "
                         f"tensor in blocks of {state.blocksize} has {'; '.join(wrong)}. Pass the two results of "
                         "one quantize_4bit call.")


def _use_triton(packed: torch.Tensor) -> bool:
    if packed.device.type != "cuda":
        return False
    from .kernels import triton_dequant

    return triton_dequant.available()


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode ``packed`` to a tensor of ``state.shape`` in ``dtype``
    (default: the dtype that was quantized).

    Raises:
        ValueError: for a ``dtype`` that is not a float dtype, or ``packed`` and ``state`` of different
            tensors (their byte and block counts do not fit ``state.shape``).
    """
    dtype = dtype or state.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dequantize_4bit decodes to a float dtype (torch.bfloat16, torch.float16, torch.float32, "
                         f"...), got {dtype!r}")
    _check_fits(packed, state)
    if packed.is_meta:  # nothing to decode (``qlora estimate`` measures on meta): the reference's ops cost seconds
        return torch.empty(state.shape, dtype=dtype, device="meta")
    if _use_triton(packed):
        from .kernels import triton_dequant

        return triton_dequant.dequantize_4bit(packed, state, dtype)
    if compiled_cpu.supports(packed, state.shape.numel(), state.blocksize):
        out = compiled_cpu.dequantize(packed, state, dtype)
        if out is not None:
            return out
    return torch_ref.dequantize_4bit_ref(packed, block_absmax(state), state.blocksize, state.quant_type, state.shape,
                                         dtype)
