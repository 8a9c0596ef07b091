"""qlora: fine-tune large language models on one GPU with QLoRA.

The frozen base model is stored in 4-bit NormalFloat with double-quantized
block constants, LoRA adapters train in 16/32-bit, and optimizer states live in
paged memory. The top-level names below are the public API; they are imported
lazily so that ``import qlora`` stays cheap (no transformers import).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "qlora.model.load",
    "add_lora": "qlora.model.inject",
    "save_adapter": "qlora.model.adapter_io",
    "load_adapter": "qlora.model.adapter_io",
    "add_special_tokens": "qlora.model.tokens",
    "merge": "qlora.model.merge",
    "save_merged": "qlora.model.merge",
    "save_quantized": "qlora.model.quantized_io",
    "quantize_model": "qlora.model.quantize",
    "set_adapter": "qlora.model.multi_adapter",
    "set_adapters": "qlora.model.multi_adapter",
    "adapter_rows": "qlora.model.multi_adapter",
    "combine_adapters": "qlora.model.multi_adapter",
    "delete_adapter": "qlora.model.multi_adapter",
    "Chat": "qlora.infer.chat",
}
# Subpackages reachable as attributes after a plain ``import qlora`` (``qlora.optim.PagedAdamW``), also lazily.
_SUBPACKAGES = ("chat", "infer", "model", "nn", "optim", "quant", "serve", "train")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"qlora.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qlora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The public names and subpackages too, before their first use (for ``dir()`` and tab completion)."""
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})


__all__ = ["__version__", *_LAZY]
