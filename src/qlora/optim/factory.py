"""Optimizers by the names that training configs use: ours, and the names
transformers' ``optim`` (as TRL, axolotl and LLaMA-Factory configs spell it)
gives the same maths: torch's AdamW, bitsandbytes' 8-bit and paged AdamW."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import UsageError
from .adamw import AdamW, AdamW8bit, ParamsT, PagedAdamW, PagedAdamW8bit
from ..optimizer_names import OPTIMIZER_NAMES, optimizer_name

OPTIMIZERS: dict[str, type[AdamW]] = dict(zip(OPTIMIZER_NAMES, (AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit),
                                           strict=True))

_FIXED_BY_NAME = {"state_bits", "paged"}


def create_optimizer(name: str, params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` (ours or an alias) over ``params``.

    Raises:
        UsageError (a ValueError): for an unknown name (saying what qlora has), an unknown keyword, or one the name
            already fixes (``state_bits``, ``paged``), listing what is valid.
    """
    name = optimizer_name(name)
    valid = [k for k in inspect.signature(AdamW).parameters if k not in {"params", *_FIXED_BY_NAME}]
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise UsageError(f"optimizer {name!r} does not take {', '.join(bad)}; valid options: {', '.join(valid)}")
    return OPTIMIZERS[name](params, **kwargs)
