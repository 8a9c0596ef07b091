"""A PiSSA/OLoRA adapter as plain LoRA on the original weights (PEFT's conversion).

Training changed ``B0, A0`` into ``B, A`` on the residual base ``W - s B0 A0``, so the
trained layer is ``W + s (B A - B0 A0)``: the rank-``2r`` LoRA ``A' = [A; A0]``,
``B' = [B, -B0]`` with the same scale, which is what PEFT writes for
``save_pretrained(path_initial_model_for_weight_conversion=...)``: rank and alpha
doubled (alpha times sqrt 2 with rsLoRA, so ``alpha / sqrt(r)`` stays), the same for
``rank_pattern``/``alpha_pattern``, and ``init_lora_weights: true``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapter_tensors import PEFT_PREFIX
from .inject import lora_layers


def residual_paths(model: nn.Module, adapter_name: str) -> list[str]:
    """The layers whose adapter ``adapter_name`` was made by a residual init (PiSSA, OLoRA)."""
    return [path for path, layer in lora_layers(model).items() if adapter_name in layer.initial_factors]


@torch.no_grad()
def convert_to_lora(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor],
                    config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` of the converted adapter, from the file tensors and PEFT config of the trained one."""
    layers = lora_layers(model)
    out = dict(tensors)
    for path in residual_paths(model, adapter_name):
        a0, b0 = layers[path].initial_factors[adapter_name]
        key_a, key_b = f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"
        out[key_a] = torch.cat([tensors[key_a], a0.to(tensors[key_a])], dim=0)
        out[key_b] = torch.cat([tensors[key_b], -b0.to(tensors[key_b])], dim=1)
    factor = math.sqrt(2) if config.get("use_rslora") else 2
    config = config | {"r": 2 * config["r"], "lora_alpha": factor * config["lora_alpha"], "init_lora_weights": True,
                       "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
                       "alpha_pattern": {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}}
    return out, config


def first_half(saved: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The trained factor inside a converted one (``A`` of ``[A; A0]``, ``B`` of ``[B, -B0]``), for a resume."""
    return saved[tuple(slice(0, n) for n in current.shape)]
