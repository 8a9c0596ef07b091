"""Neural-network modules: the 4-bit linear layer, LoRA and AdaLoRA adapters."""

from .adalora import AdaLoraLinear
from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraSpec

__all__ = ["AdaLoraLinear", "Linear4bit", "LoraLinear", "LoraSpec"]
