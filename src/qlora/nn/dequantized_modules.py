"""A module with its 4-bit layers dequantized, for training it whole (PEFT's ``modules_to_save``).

A module trained whole needs weights that take gradients, and a 4-bit layer's packed codes take none: a
4-bit output head (a checkpoint whose ``llm_int8_skip_modules`` did not keep it dense) named in
``modules_to_save`` would train nothing and save nothing (PEFT fails there too: bitsandbytes' 4-bit weights
cannot require gradients). Its trained copy is a dense ``nn.Linear`` of the dequantized weight instead, in
the layer's compute dtype: the module PEFT trains on a 16-bit base, saved under the same keys and shapes.
"""

from __future__ import annotations

from torch import nn

from .experts4bit import Experts4bit
from .linear4bit import Linear4bit


def undequantizable(module: nn.Module) -> str | None:
    """The name (``""``: the module itself) of a 4-bit part of ``module`` that no dense layer of the same file
    layout replaces: 4-bit MoE experts, or a layer quantized from GPT-2's ``Conv1D`` (stored transposed); or
    None."""
    for name, part in module.named_modules():
        if isinstance(part, Experts4bit) or (isinstance(part, Linear4bit) and part.from_conv1d):
            return name
    return None


def dequantized(module: nn.Module) -> nn.Module:
    """``module`` with every :class:`Linear4bit` in it replaced by an ``nn.Linear`` of its dequantized weight
    (frozen, compute dtype): a new module for a :class:`Linear4bit` itself, else ``module``, changed in place.
    Check :func:`undequantizable` first."""
    if isinstance(module, Linear4bit):
        weight = module.dequantize()
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        return dense
    for name, child in list(module.named_children()):
        dense = dequantized(child)
        if dense is not child:
            setattr(module, name, dense)
    return module
