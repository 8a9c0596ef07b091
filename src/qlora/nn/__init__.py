"""Neural-network modules: the 4-bit linear layer and LoRA adapters."""

from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraSpec

__all__ = ["Linear4bit", "LoraLinear", "LoraSpec"]
