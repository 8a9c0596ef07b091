"""RouterLora: LoRA on an MoE router's 2-D weight (PEFT's ``target_parameters`` on ``gate.weight``).

In transformers 5 a router (Qwen3-MoE's ``Qwen3MoeTopKRouter``, DeepSeek-V3's
``DeepseekV3TopkRouter``, OLMoE's, Mixtral's) is no ``nn.Linear``: it holds a
``(num_experts, hidden)`` weight and computes logits, top-k and scores in one
forward. PEFT's ``all-linear`` turns it into ``target_parameters=["gate.weight"]``
and wraps the router in a ``ParamWrapper`` holding ``lora_A: (r, hidden)`` and
``lora_B: (num_experts, r)``; the router then runs on ``W + scale * B @ A``
(scale = alpha / r, alpha / sqrt(r) with rsLoRA). The logits feed a top-k, so
the delta cannot be added to the output as for a linear layer: the router's own
forward runs on the adapted weight, passed in with ``torch.func.functional_call``
(the module is left as it is). Routers are never quantized, so the weight is the
16-bit base's. PEFT has no dropout, DoRA or lora_bias for these adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear4bit import Linear4bit
from .lora import AdapterSlots, LoraSpec, check_new_adapter, plain_init


def is_router(module: nn.Module) -> bool:
    """Whether ``module`` holds a 2-D floating-point ``weight`` of its own without being a layer qlora adapts
    as linear or embedding: an MoE router (transformers 5's ``*TopKRouter``, or PhiMoE's, an ``nn.Linear``
    whose forward also picks the experts). (``nn.Linear`` subclasses that compute a plain linear map, such as
    Falcon's, are told apart by :func:`qlora.model.quantize.is_linear_like`.)"""
    weight = module._parameters.get("weight")
    return (weight is not None and weight.dim() == 2 and weight.is_floating_point()
            and not isinstance(module, (nn.Embedding, Linear4bit)) and type(module).forward is not nn.Linear.forward)


class RouterLora(AdapterSlots):
    """A frozen router with named LoRA adapters on its 2-D ``weight``.

    ``lora_A[adapter]`` and ``lora_B[adapter]`` are ``nn.Linear`` holding PEFT's
    ``(r, in)`` and ``(out, r)`` tensors, so adapter files copy one to one.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_router(base_layer):
            raise ValueError(f"{type(base_layer).__name__} has no 2-D weight of its own to adapt")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = base_layer.weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # --- adapters -----------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        check_new_adapter(self.specs, name, spec)
        if spec.dropout or spec.use_dora or spec.lora_bias or spec.init not in ("kaiming", "gaussian"):
            raise ValueError("LoRA on a router weight (target_parameters) has no dropout, DoRA, lora_bias or LoftQ, "
                             "as in PEFT")
        device = self.base_layer.weight.device
        self.lora_A[name] = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=spec.dtype)
        self.lora_B[name] = nn.Linear(spec.r, self.out_features, bias=False, device=device, dtype=spec.dtype)
        self.specs[name] = spec
        self.reset_adapter(name)
        if not self.active:
            self.active = {name: 1.0}

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """PEFT's init: A Kaiming-uniform (or N(0, 1/r)), B zeros."""
        plain_init(self.lora_A[name].weight, self.lora_B[name].weight, self.specs[name])

    def delete_adapter(self, name: str) -> None:
        if name in self.specs:
            del self.lora_A[name], self.lora_B[name]
        self.specs.pop(name, None)
        self.active.pop(name, None)

    def delta(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s delta ``scale * B @ A`` (``(out, in)``, the adapter's dtype; differentiable)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.specs[name].scaling

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The float32 router weight with the active adapters (with their weights) folded in."""
        w = self.base_layer.weight.detach().float().clone()
        for name, coef in self.active.items():
            w += self.delta(name).float().to(w.device) * coef
        return w

    # --- forward ------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if self.disabled or not self.active:
            return self.base_layer(*args, **kwargs)
        base = self.base_layer.weight
        weight = base + sum(self.delta(n).to(base.dtype) * coef for n, coef in self.active.items() if coef)
        return torch.func.functional_call(self.base_layer, {"weight": weight}, args, kwargs)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}" for n, s in self.specs.items())
        return f"router {self.out_features}x{self.in_features}, adapters=[{ranks}], active={list(self.active)}"
