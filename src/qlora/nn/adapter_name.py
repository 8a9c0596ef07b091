"""Which adapter names fit: each keys the ``nn.ModuleDict``/``nn.ParameterDict`` of every adapter
layer (PEFT's layout, ``lora_A.<name>``), so torch's rules for module names apply to it."""

from __future__ import annotations

from torch import nn


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or not name:
        return "an adapter name must be a non-empty string"
    if "." in name:
        return "torch's module names cannot hold '.'"
    if hasattr(nn.ModuleDict(), name) or hasattr(nn.ParameterDict(), name):
        return "it is the name of an attribute of torch's module dictionaries"
    return None
