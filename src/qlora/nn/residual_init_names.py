"""The names of the residual LoRA initializations (PiSSA, ``pissa_niter_K``, OLoRA; PEFT's spellings), apart
from their torch arithmetic (:mod:`qlora.nn.residual_init`) so that checking ``--init`` does not import torch."""

from __future__ import annotations

import re

PISSA_NITER = re.compile(r"pissa_niter_(0|[1-9][0-9]*)")


def is_residual_init(init: str) -> bool:
    """Whether ``init`` is one of these (``pissa``, ``pissa_niter_K`` with K >= 0 as PEFT allows, ``olora``)."""
    return init in ("pissa", "olora") or PISSA_NITER.fullmatch(init) is not None
