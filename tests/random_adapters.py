"""Non-zero LoRA adapters for tests: a fresh adapter's B is zero, so it would change nothing."""

from __future__ import annotations

import torch

from qlora.nn import LoraLinear


def randomize_lora_b(model: torch.nn.Module, seed: int, scale: float = 0.05, name: str = "default") -> None:
    """Fill adapter ``name``'s B matrices with seeded noise of std ``scale``, layer by layer in module order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLinear) and name in layer.specs:
                w = layer.lora_B[name].weight
                w.copy_(scale * torch.randn(w.shape, generator=g))
