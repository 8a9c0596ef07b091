"""A transformers model whose 4-bit layers hold what bitsandbytes' quantization decodes to: the reference a
qlora run on a 4-bit base is compared with (the base is frozen, so the decoded weights are its whole effect)."""

from __future__ import annotations

import torch
from bitsandbytes import functional as bnb_F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute


def decoded(weight: torch.Tensor, quant: str, blocksize: int, nested: bool) -> torch.Tensor:
    """``weight`` quantized by bitsandbytes and decoded by its portable reference (its native CPU decoder is
    off when a row is shorter than a block; see tests/test_quant_exact.py)."""
    packed, state = bnb_F.quantize_4bit(weight.contiguous(), blocksize=blocksize, quant_type=quant,
                                        compress_statistics=nested)
    absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, blocksize, weight.shape,
                                    torch.float32)


def decode_quantized_layers(plain: torch.nn.Module, quantized_of: torch.nn.Module, quant: str, blocksize: int,
                            nested: bool) -> None:
    """Replace, in place, the weight of every layer of ``plain`` that qlora's ``quantized_of`` holds in 4 bits
    by bitsandbytes' decoding of it."""
    quantized = {n.removesuffix(".base_layer") for n, m in quantized_of.named_modules()
                 if type(m).__name__ == "Linear4bit"}
    assert quantized
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name in quantized:  # a Conv1D (GPT-2) stores the transpose of a linear layer's weight
                conv = not isinstance(module, torch.nn.Linear)
                w = decoded(module.weight.t() if conv else module.weight, quant, blocksize, nested)
                module.weight.copy_(w.t() if conv else w)
