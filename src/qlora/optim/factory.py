"""Optimizers by the names that training configs use: ours, and the names
transformers' ``optim`` (as TRL, axolotl and LLaMA-Factory configs spell it)
gives the same maths: torch's AdamW, bitsandbytes' 8-bit and paged AdamW."""

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

# transformers' optim names whose update is exactly one of ours.
OPTIMIZER_ALIASES = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw",  # torch.optim.AdamW (foreach or fused kernel)
    "adamw_bnb_8bit": "adamw_8bit",  # bitsandbytes' AdamW8bit; transformers' adamw_8bit is the same
}
# Names of other tools whose maths differ from every optimizer qlora has: why not.
_NOT_THE_SAME = {
    "adamw_hf": "transformers' own (removed) AdamW adds eps before the bias correction, so its steps differ "
                "from torch's",
    "adamw_torch_8bit": "torchao's 8-bit AdamW quantizes its states differently from bitsandbytes' (qlora's "
                        "adamw_8bit)",
    "adamw_torch_4bit": "torchao's 4-bit AdamW is not implemented",
    "adamw_torch_xla": "it is torch's AdamW for TPUs, which qlora does not run on (adamw is the same update on CUDA "
                       "and the CPU)",
    "adamw_torch_npu_fused": "it is torch's AdamW fused for Ascend NPUs, which qlora does not run on (adamw is the "
                             "same update on CUDA and the CPU)",
}

_FIXED_BY_NAME = {"state_bits", "paged"}


def optimizer_name(name: str) -> str:
    """Our name of the optimizer ``name`` (ours or another tool's name for the same maths).

    Raises:
        ValueError: for any other name, saying what qlora has instead.
    """
    name = OPTIMIZER_ALIASES.get(name, name)
    if name in OPTIMIZERS:
        return name
    aliases = {ours: [a for a, o in OPTIMIZER_ALIASES.items() if o == ours] for ours in OPTIMIZERS}
    have = ", ".join(f"{ours}{' (= ' + ', '.join(aliases[ours]) + ')' if aliases[ours] else ''}" for ours in OPTIMIZERS)
    why = _NOT_THE_SAME.get(name, "qlora trains with AdamW only (torch's update, with 32-bit or bitsandbytes' 8-bit "
                                  "states, resident or paged)")
    raise ValueError(f"{name!r} is not available: {why}. Optimizers: {have}.")


def create_optimizer(name: str, params: ParamsT, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` (ours or an alias) over ``params``.

    Raises:
        ValueError: for an unknown name (saying what qlora has), an unknown keyword, or one the name
            already fixes (``state_bits``, ``paged``), listing what is valid.
    """
    name = optimizer_name(name)
    valid = [k for k in inspect.signature(AdamW).parameters if k not in {"params", *_FIXED_BY_NAME}]
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"optimizer {name!r} does not take {', '.join(bad)}; valid options: {', '.join(valid)}")
    return OPTIMIZERS[name](params, **kwargs)
