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


def add_random_moe_lora(model: torch.nn.Module) -> None:
    """All-linear LoRA plus LoRA on the expert weights (``target_parameters``), every B filled with seeded noise
    (std 0.05, parameter order): an adapter that changes attention and experts alike."""
    import qlora

    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                   target_parameters=["gate_up_proj", "down_proj"], verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
