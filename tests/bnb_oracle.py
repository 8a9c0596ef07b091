"""transformers + bitsandbytes models as oracles: computed by bitsandbytes' reference path.

On a CPU with AVX512-BF16, bitsandbytes switches each ``Linear4bit`` in eval mode to a fused CPU kernel
that rounds the activations and absmax to bf16 (``support_avx512bf16_for_cpu``). Its reference path,
dequantize then matmul in the compute dtype, is the one its CUDA backend and other CPUs run, and the one
qlora's results are held to; so the oracle computes by that path on every machine.
"""

from __future__ import annotations

from torch import nn


def reference_path(model: nn.Module) -> nn.Module:
    """``model`` with every bitsandbytes 4-bit layer computing by the reference path (before its first forward)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
