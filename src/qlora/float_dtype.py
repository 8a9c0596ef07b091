"""float_dtype: a floating dtype from what torch, transformers and training configs spell.

The public functions take ``compute_dtype`` / ``dtype`` as transformers' ``dtype=`` does:
``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or the short ``"bf16"`` of training
configs. Anything else (an integer dtype, a typo) is refused naming the argument, before any
weight is read or any module replaced.
"""

from __future__ import annotations

import torch

from .errors import UsageError

_NAMES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,  # for exactness checks
}


def float_dtype(value: torch.dtype | str, argument: str) -> torch.dtype:
    """``value`` as a 16, 32 or 64-bit float dtype; ``argument`` names it in the error.

    Raises:
        UsageError: not a float dtype or one of its names.
    """
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _NAMES:
            return _NAMES[key]
    elif isinstance(value, torch.dtype) and value in _NAMES.values():
        return value
    raise UsageError(f"{argument} must be a float dtype (torch.bfloat16, torch.float16, torch.float32 or "
                     f"torch.float64) or its name ('bfloat16', 'bf16', 'float16', 'fp16', 'float32', 'fp32', ...), "
                     f"got {value!r}.")
