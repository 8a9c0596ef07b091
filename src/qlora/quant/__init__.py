"""4-bit quantization core: code books, blockwise (de)quantization, double
quantization and the serializable :class:`QuantState`.

Bit-exact with bitsandbytes 0.50 (packed bytes, constants and decoded values).
Names are imported lazily, so that ``BLOCKSIZES`` alone does not import torch.
"""

from qlora.lazy_names import lazy_attributes, lazy_dir

_LAZY = {
    "BLOCKSIZES": "qlora.quant.blocksizes",
    "NestedState": "qlora.quant.quant_state",
    "NonFiniteError": "qlora.quant.fourbit",
    "QuantState": "qlora.quant.quant_state",
    "bits_per_parameter": "qlora.quant.quant_state",
    "code_4bit": "qlora.quant.codebook",
    "dequantize_4bit": "qlora.quant.fourbit",
    "dequantize_blockwise": "qlora.quant.blockwise",
    "dynamic_code": "qlora.quant.codebook",
    "quantize_4bit": "qlora.quant.fourbit",
    "quantize_blockwise": "qlora.quant.blockwise",
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(globals(), _LAZY)
__all__ = list(_LAZY)
