"""Optimizers by the names that training configs use (the names transformers'
``optim`` option uses for the bitsandbytes optimizers)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .adamw import AdamW, AdamW8bit, ParamsT, PagedAdamW, PagedAdamW8bit

OPTIMIZERS: dict[str, type[AdamW]] = {
    "adamw": AdamW,
    "adamw_8bit": AdamW8bit,
    "paged_adamw_32bit": PagedAdamW,
    "paged_adamw_8bit": PagedAdamW8bit,
}

_FIXED_BY_NAME = {"state_bits", "paged"}


def create_optimizer(name: str, params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``params``.

    Raises:
        ValueError: for an unknown name, an unknown keyword, or one the name
            already fixes (``state_bits``, ``paged``), listing what is valid.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(sorted(OPTIMIZERS))}")
    valid = [k for k in inspect.signature(AdamW).parameters if k not in {"params", *_FIXED_BY_NAME}]
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"optimizer {name!r} does not take {', '.join(bad)}; valid options: {', '.join(valid)}")
    return OPTIMIZERS[name](params, **kwargs)
