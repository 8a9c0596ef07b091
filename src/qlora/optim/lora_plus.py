"""LoRA+ parameter groups (Hayou et al. 2024): the B matrices learn faster.

LoRA's B starts at zero and, with one learning rate for A and B, moves too
slowly relative to A; LoRA+ gives B a learning rate ``ratio`` times A's
(the paper suggests ratios around 16).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import UsageError


def lora_plus_param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | torch.nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups with ``lr`` for trainable parameters and ``ratio * lr``
    for the B matrices (``lora_B``, and ``lora_embedding_B`` of embedding adapters); frozen
    parameters are left out. DoRA magnitudes and trained biases learn at ``lr``.

    Args:
        named_parameters: a module or its ``named_parameters()``.
        lr: learning rate of LoRA A (and any other trainable parameter).
        ratio: lr_B / lr_A.
        weight_decay: for both groups.

    Raises:
        UsageError (a ValueError): if ``ratio`` or ``lr`` is not positive, or nothing is trainable.
    """
    if not ratio > 0:
        raise UsageError(f"LoRA+ ratio must be positive, got {ratio}")
    if not lr > 0:
        raise UsageError(f"lr must be positive, got {lr}")
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    a_params, b_params = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (b_params if "lora_B" in name or "lora_embedding_B" in name else a_params).append(p)
    if not a_params and not b_params:
        raise UsageError("no trainable parameters for LoRA+ groups")
    groups = [
        {"params": a_params, "lr": lr, "weight_decay": weight_decay},
        {"params": b_params, "lr": lr * ratio, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
