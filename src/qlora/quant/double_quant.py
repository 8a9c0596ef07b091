"""Double quantization: compress the 4-bit blocks' float32 absmax to 8 bits.

Step by step (QLoRA paper, section 3):

1. The first quantization leaves one float32 absmax per block of 64 weights:
   32 / 64 = 0.5 extra bits per weight.
2. These constants are all positive and similar, so subtract their mean (the
   ``offset``) to centre them around zero; this makes a signed code usable.
3. Quantize the centred constants blockwise (block 256) with the signed 8-bit
   dynamic code, keeping one float32 absmax per 256 constants.
4. Cost: 8 / 64 + 32 / (64 * 256) = 0.127 bits per weight, a saving of 0.373.

Decoding reverses it: ``absmax = dynamic[codes] * nested_absmax + offset``.
"""

from __future__ import annotations

import torch

from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebook import dynamic_code
from .quant_state import NestedState, QuantState

NESTED_BLOCKSIZE = 256


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, NestedState]:
    """Returns ``(codes uint8, offset float32 scalar, nested state)``.

    The offset is bitsandbytes' float32 ``absmax.mean()``, except where that sum overflows (constants
    near float32's maximum, e.g. bf16 weights above ~1e34 over many blocks): bitsandbytes then stores
    an infinite offset and the whole tensor decodes to NaN; here the mean is taken in float64, which
    always fits, so the state stays finite and decodes (in bitsandbytes too) to the weights.
    """
    offset = absmax.mean()
    if not bool(torch.isfinite(offset)):
        offset = absmax.double().mean().float()
    code = dynamic_code(signed=True, device=absmax.device)
    codes, nested_absmax = quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
    return codes, offset, NestedState(nested_absmax, code.clone(), NESTED_BLOCKSIZE, torch.float32)


def decompress_absmax(codes: torch.Tensor, offset: torch.Tensor, nested: NestedState) -> torch.Tensor:
    """The float32 absmax vector back from its 8-bit form."""
    absmax = dequantize_blockwise(codes, nested.absmax, nested.code, nested.blocksize, torch.float32)
    return absmax + offset.to(absmax.device)


def block_absmax(state: QuantState) -> torch.Tensor:
    """A 4-bit state's per-block absmax as float32 values: decoded where it is double-quantized."""
    if state.nested is None:
        return state.absmax
    assert state.offset is not None
    return decompress_absmax(state.absmax, state.offset, state.nested)
