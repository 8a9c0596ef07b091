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


def save_random_adapter(model_dir, out, seed: int) -> None:
    """A qlora adapter on attention and MLP (``q_proj``, ``v_proj``, ``down_proj``, rank 4) whose B matrices hold
    seeded noise of std 0.3, large enough that its answers differ from the base's, saved to ``out``."""
    import qlora

    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(seed)
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["q_proj", "v_proj", "down_proj"])
    randomize_lora_b(model, seed, scale=0.3)
    qlora.save_adapter(model, out)


def save_random_peft_adapter(model_dir, out, seed: int, **options) -> None:
    """A LoRA adapter made by PEFT (``LoraConfig(lora_alpha=8, init_lora_weights=False, **options)``) on the model
    in ``model_dir``, every trainable tensor (modules saved whole and token rows too) moved from its init by seeded
    noise of std 0.1, saved by PEFT to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(**(dict(lora_alpha=8, init_lora_weights=False) | options)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)


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
