"""A module trained whole by some adapters (PEFT's ``modules_to_save``): one copy per adapter.

PEFT's ``ModulesToSaveWrapper`` layout: the base module stays as ``original_module`` and each
adapter that saved the module has its own copy in ``modules_to_save[<adapter>]``. The active
adapter picks the copy that runs; an adapter without one (and the model with adapters off)
runs the original. So several adapters share one model without one's weights leaking into
another's outputs, and only adapters that saved the module pay for a copy.

The wrapper is invisible in the state dict: it holds the original module's tensors under the module's own
keys (``lm_head.weight``), so a base model saved with adapters loaded (transformers' ``save_pretrained``,
:func:`qlora.save_quantized`) is a checkpoint transformers loads. The copies are adapter weights, saved with
their adapters, and a state dict loaded into the model leaves them as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .dequantized_modules import dequantized


class SavedModules(nn.Module):
    """``original_module`` plus a copy of it per adapter that trained it whole."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None  # the adapter whose copy runs (None, or one without a copy: the original)
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # per batch row adapter (see qlora.model.multi_adapter)
        self.register_state_dict_post_hook(_original_keys)
        self.register_load_state_dict_pre_hook(_into_original)

    def add_copy(self, name: str) -> nn.Module:
        """A new copy of the original for adapter ``name`` (frozen; the caller loads its weights), its 4-bit
        layers dense (:func:`qlora.nn.dequantized`)."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        module = dequantized(copy.deepcopy(self.original_module))
        for p in module.parameters():
            p.requires_grad_(False)
        self.modules_to_save[name] = module
        return module

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, names: list[str]) -> None:
        """Run the copy of the one adapter in ``names`` that has one (none: the original).

        Raises:
            ValueError: two of ``names`` have copies; a module trained whole is not a sum of deltas,
                so no weighted combination of two copies exists (PEFT refuses it too).
        """
        own = [n for n in names if n in self.modules_to_save]
        if len(own) > 1:
            raise ValueError(f"adapters {own} each trained this module whole; only one of them can run at a time")
        self.active = own[0] if own else None

    def module_for(self, name: str | None) -> nn.Module:
        """The module adapter ``name`` runs: its copy, or the original."""
        if self.disabled or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def __getattr__(self, name: str):
        # Model code reads the wrapped module's attributes (``get_input_embeddings().weight``,
        # ``.num_embeddings``): those of the module that runs now.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save", "active", "disabled"):
                raise  # not set up yet (while built or copied): no module to ask
            return getattr(self.module_for(self.active), name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_adapters is None:
            return self.module_for(self.active)(x, *args, **kwargs)
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"{len(self.row_adapters)} row adapters for a batch of {x.shape[0]} rows")
        groups: dict[int, list[int]] = {}
        modules: dict[int, nn.Module] = {}
        for i, name in enumerate(self.row_adapters):
            module = self.module_for(name)
            groups.setdefault(id(module), []).append(i)
            modules[id(module)] = module
        if len(groups) == 1:
            return next(iter(modules.values()))(x, *args, **kwargs)
        out = None
        for key, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            y = modules[key](x[index], *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[index] = y
        return out

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active}"


_ORIGINAL = "original_module."


def _original_keys(module: SavedModules, state_dict: dict, prefix: str, local_metadata) -> None:
    """The wrapper's state dict: the original module's, under the wrapped module's own keys."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        value = state_dict.pop(key)
        if key.startswith(prefix + _ORIGINAL):
            state_dict[prefix + key[len(prefix + _ORIGINAL):]] = value


def _into_original(module: SavedModules, state_dict: dict, prefix: str, local_metadata, strict: bool,
                   missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Load the wrapped module's keys into the original; the copies keep their weights (a state dict written
    with the wrapper's own keys, ``original_module.`` and copies, loads as written)."""
    own = [k for k in state_dict
           if k.startswith(prefix) and not k.startswith((prefix + _ORIGINAL, prefix + "modules_to_save."))]
    if not own:
        return
    for key in own:
        state_dict[prefix + _ORIGINAL + key[len(prefix):]] = state_dict.pop(key)
    for key, value in module.modules_to_save.state_dict(prefix=prefix + "modules_to_save.", keep_vars=True).items():
        state_dict.setdefault(key, value)
