"""4-bit quantization core: code books, blockwise (de)quantization, double
quantization and the serializable :class:`QuantState`.

Bit-exact with bitsandbytes 0.50 (packed bytes, constants and decoded values).
"""

from .blockwise import dequantize_blockwise, quantize_blockwise
from .codebook import code_4bit, dynamic_code
from .fourbit import BLOCKSIZES, NonFiniteError, dequantize_4bit, quantize_4bit
from .quant_state import NestedState, QuantState, bits_per_parameter

__all__ = [
    "BLOCKSIZES", "NestedState", "NonFiniteError", "QuantState", "bits_per_parameter", "code_4bit", "dequantize_4bit",
    "dequantize_blockwise", "dynamic_code", "quantize_4bit", "quantize_blockwise",
]
