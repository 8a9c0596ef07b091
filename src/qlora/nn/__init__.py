"""Neural-network modules: the 4-bit linear layer, 4-bit MoE experts, LoRA (on linear layers and
embeddings) and AdaLoRA adapters."""

from .adalora import AdaLoraLinear
from .experts4bit import (Experts4bit, ExpertsLayout, computed_experts, expert_matrix, expert_weight, expert_weight_names,
                          experts_layout)
from .experts_lora import ExpertsLora
from .linear4bit import Linear4bit
from .lora import LoraLinear, LoraSpec
from .lora_embedding import LoraEmbedding

__all__ = ["AdaLoraLinear", "Experts4bit", "ExpertsLayout", "ExpertsLora", "Linear4bit", "LoraEmbedding", "LoraLinear",
           "LoraSpec", "computed_experts", "expert_matrix", "expert_weight", "expert_weight_names", "experts_layout"]
