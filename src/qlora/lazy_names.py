"""A package's public names, imported from their modules on first use (PEP 562).

A package whose ``__init__`` imported all its modules would import torch for any one light name
(``qlora.quant.BLOCKSIZES``) and so for every command's ``--help``; lazily, only what is used loads.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable


def lazy_attributes(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package`` that imports each of ``names`` (name -> module) when first read."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__


def lazy_dir(namespace: dict[str, Any], names: Iterable[str]) -> Callable[[], list[str]]:
    """The module ``__dir__`` that lists ``names`` beside what ``namespace`` already holds, so that ``dir()``,
    ``help()`` and tab completion show the public names before their first use."""
    listed = [*names]

    def __dir__() -> list[str]:
        return sorted({*namespace, *listed})

    return __dir__
