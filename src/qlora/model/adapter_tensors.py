"""Adapter file keys and copying saved adapter tensors into a model, with the check every loader needs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError

PEFT_PREFIX = "base_model.model."  # PEFT's adapter files name model tensors under this prefix


def lora_key(key: str) -> tuple[str, str]:
    """``(module path, tensor kind)`` of an adapter file's LoRA key: ``...q_proj.lora_A.weight`` gives
    ``("...q_proj", "A.weight")``."""
    path, _, kind = key[len(PEFT_PREFIX):].rpartition(".lora_")
    return path, kind


def copy_adapter_tensor(param: nn.Parameter, value: torch.Tensor, key: str, source: str | Path,
                        trainable: bool) -> None:
    """Copy ``value`` (file key ``key`` of ``source``) into ``param``; a shape
    mismatch means the adapter was made for another base model."""
    if param.shape != value.shape:
        raise UsageError(f"{source} was made for another base model: {key} has shape {tuple(value.shape)} "
                         f"but this model's layer needs {tuple(param.shape)}.")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
    param.requires_grad_(trainable)
