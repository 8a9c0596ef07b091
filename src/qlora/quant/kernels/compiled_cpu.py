"""Compiled CPU dequantizer: the reference's arithmetic in one fused loop.

The eager reference (:mod:`.torch_ref`) makes several passes over memory (a
64-bit gather per byte, the double-quant decoding of the absmax, a multiply
that rounds on store), each writing a temporary. ``torch.compile`` (Inductor's
C++ backend) fuses them into one vectorized loop, with the same float32
operations in the same order, so the result is bit-identical::

    absmax = dynamic[absmax_code] * nested_absmax[block // 256] + offset
    out    = table[nibble] * absmax          (float32, rounded once to dtype)

Compiled once per process for symbolic sizes (the first call of a new
signature costs seconds, hence only tensors of at least :data:`MIN_ELEMENTS`
take this path). Where compilation is not possible (no C++ compiler, an
unsupported platform) the caller falls back to the eager reference, after
one warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

MIN_ELEMENTS = 1 << 20  # below this the eager reference is fast enough and compiling would dominate
_failed = False


def _decode(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
            dtype: torch.dtype) -> torch.Tensor:
    byte = packed.reshape(-1).to(torch.int32)
    values = torch.stack([code[byte >> 4], code[byte & 15]], dim=-1).reshape(-1, blocksize)
    return (values * absmax[:, None]).to(dtype).reshape(-1)


def _dequantize_nested(packed: torch.Tensor, code: torch.Tensor, absmax_codes: torch.Tensor,
                       nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor,
                       blocksize: int, nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    block = torch.arange(absmax_codes.numel(), device=absmax_codes.device) // nested_blocksize
    absmax = nested_code[absmax_codes.to(torch.int32)] * nested_absmax[block] + offset
    return _decode(packed, code, absmax, blocksize, dtype)


def _dequantize_plain(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                      blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    return _decode(packed, code, absmax, blocksize, dtype)


@functools.cache
def _compiled(nested: bool):
    fn = _dequantize_nested if nested else _dequantize_plain
    return torch.compile(fn, fullgraph=True, dynamic=True)


def supports(packed: torch.Tensor, n: int, blocksize: int) -> bool:
    """CPU, large enough to be worth it, whole blocks only, and compiling has not failed before."""
    return (not _failed and packed.device.type == "cpu" and n >= MIN_ELEMENTS and n % blocksize == 0
            and packed.numel() * 2 == n)


def dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor | None:
    """``state.shape`` in ``dtype``, or ``None`` when compilation failed (the caller then
    runs the eager reference)."""
    global _failed
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    code = state.code.float()
    try:
        if state.nested is not None:
            out = _compiled(True)(flat, code, state.absmax, state.nested.absmax.float(), state.nested.code.float(),
                                  state.offset.float().reshape(()), state.blocksize, state.nested.blocksize, dtype)
        else:
            out = _compiled(False)(flat, code, state.absmax.float(), state.blocksize, dtype)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: use the eager path
        _failed = True
        warnings.warn(f"qlora: compiling the CPU dequantizer failed ({type(exc).__name__}: {exc}); "
                      "using the slower eager path", RuntimeWarning, stacklevel=3)
        return None
    return out.reshape(state.shape)
