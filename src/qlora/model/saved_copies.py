"""Modules trained whole (``modules_to_save``) kept as one copy per adapter, as PEFT keeps them.

:func:`load_copies` wraps each such module of the model in a :class:`qlora.nn.SavedModules`
(once: later adapters add their copies to the same wrapper) and loads the adapter's weights into
its copy; :func:`unwrap_saved_modules` puts the running module back in the wrapper's place, for
a merge, which folds one adapter into a plain checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..nn import SavedModules
from .adapter_tensors import PEFT_PREFIX, copy_adapter_tensor
from .inject import adapter_configs, adapter_layers, saved_module_layers


def saved_module(model: nn.Module, path: str, adapter_name: str) -> nn.Module:
    """The module at ``path`` as adapter ``adapter_name`` trained it: its copy, or the module itself
    where it was trained in place."""
    module = model.get_submodule(path)
    if isinstance(module, SavedModules):
        return module.modules_to_save[adapter_name]
    return module


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def model_active_adapter(model: nn.Module) -> str | None:
    """The first adapter (in the order they were added) active in an adapter layer of ``model``: the one
    whose copy a wrapper runs when loaded (PEFT's model-level active adapter)."""
    on = {name for layer in adapter_layers(model) for name in layer.active}
    return next((name for name in adapter_configs(model) if name in on), None)


@torch.no_grad()
def load_copies(model: nn.Module, whole: dict[str, torch.Tensor], adapter_name: str, adapter_dir: Path) -> None:
    """Load the modules ``adapter_name`` trained whole (``whole``: ``<module path>.<parameter>`` -> tensor)
    as its own copies, and record them in its config (PEFT's ``modules_to_save[adapter_name]``).

    Raises:
        UsageError: a tensor of another shape than the model's.
    """
    paths = sorted({k.rpartition(".")[0] for k in whole})
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, SavedModules):
            module = SavedModules(module)
            _replace(model, path, module)
        own = module.add_copy(adapter_name)
        for key, value in whole.items():
            if key.rpartition(".")[0] == path:
                copy_adapter_tensor(own.get_parameter(key.rpartition(".")[2]), value, PEFT_PREFIX + key, adapter_dir,
                                    False)
        if module.active is None:  # running the original: the copy runs if this is the model's active adapter
            module.set_active([n for n in [model_active_adapter(model)] if n is not None])
    adapter_configs(model)[adapter_name].modules_to_save = paths


def delete_copies(model: nn.Module, adapter_name: str) -> None:
    """Free ``adapter_name``'s copies; a module no adapter keeps a copy of any more is the original again."""
    for path, module in saved_module_layers(model).items():
        if adapter_name in module.modules_to_save:
            module.delete_adapter(adapter_name)
            if not len(module.modules_to_save):
                _replace(model, path, module.original_module)


def unwrap_saved_modules(model: nn.Module) -> None:
    """Put in each wrapper's place the module that runs now (the active adapter's copy, or the
    original), dropping the others, as PEFT's ``merge_and_unload`` does; the other adapters'
    configs no longer name those modules."""
    for path, module in saved_module_layers(model).items():
        running = module.module_for(module.active)
        _replace(model, path, running)
        for name, config in adapter_configs(model).items():
            if path in config.modules_to_save and name != module.active:
                config.modules_to_save = [p for p in config.modules_to_save if p != path]
