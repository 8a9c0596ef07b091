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

from ..errors import UsageError
from ..nn import LoraEmbedding, LoraLinear, SavedModules
from .adapter_tensors import PEFT_PREFIX, copy_adapter_tensor
from .inject import adapter_configs, embedding_lora_layers, experts_lora_layers, lora_layers, saved_module_layers


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


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters active in some adapter layer of ``model``, in the order they were added."""
    layers = [*lora_layers(model).values(), *embedding_lora_layers(model).values(),
              *experts_lora_layers(model).values()]
    on = {name for layer in layers for name in layer.active}
    return [name for name in adapter_configs(model) if name in on]


def model_active_adapter(model: nn.Module) -> str | None:
    """The adapter a new copy's wrapper starts with: the first on the model active in one of its layers."""
    return next(iter(active_adapters(model)), None)


@torch.no_grad()
def load_copies(model: nn.Module, whole: dict[str, torch.Tensor], adapter_name: str, adapter_dir: Path) -> None:
    """Load the modules ``adapter_name`` trained whole (``whole``: ``<module path>.<parameter>`` -> tensor)
    as its own copies, and record them in its config (PEFT's ``modules_to_save[adapter_name]``).

    Raises:
        UsageError: a module saved whole that carries LoRA adapters here (PEFT trains a module either way,
            never both), or a tensor of another shape than the model's.
    """
    paths = sorted({k.rpartition(".")[0] for k in whole})
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, (LoraLinear, LoraEmbedding)):
            raise UsageError(f"{adapter_dir} trains {path} whole (modules_to_save), where another adapter on this "
                             f"model has LoRA ({sorted(module.specs)}); PEFT adapts a module one way only. Load these "
                             "adapters in separate runs.")
        if not isinstance(module, SavedModules):
            active = model_active_adapter(model)
            module = SavedModules(module)
            _replace(model, path, module)
            module.set_active([active] if active is not None else [])
        own = module.add_copy(adapter_name)
        for key, value in whole.items():
            if key.rpartition(".")[0] == path:
                copy_adapter_tensor(own.get_parameter(key.rpartition(".")[2]), value, PEFT_PREFIX + key, adapter_dir,
                                    False)
        if module.active is None and model_active_adapter(model) == adapter_name:
            module.set_active([adapter_name])
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
