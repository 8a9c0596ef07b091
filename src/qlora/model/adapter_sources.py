"""The folder each adapter of a model was loaded from, so that :func:`qlora.save_merged` carries what the run that
trained the merged adapter recorded beside it (its chat format, image pixel bounds and the tokens its loss was
measured on), as ``qlora merge`` does: ``qlora eval --model merged`` then measures what eval of base + adapter did.

An adapter made by :func:`qlora.add_lora`, or loaded to train on (``trainable``: what it computes is then no
longer its run's alone), has no folder noted; one loaded under a name that ``add_lora`` reuses later is told apart
by its config object, which that replaces.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .inject import adapter_configs

_LOADED = "_qlora_adapter_folders"  # adapter name -> (folder, the config object load_adapter made)
_MERGED = "_qlora_merged_folder"


def note_loaded(model: nn.Module, adapter_name: str, adapter_dir: Path) -> None:
    """Remember that ``adapter_name`` (just loaded) came from ``adapter_dir``."""
    model.__dict__.setdefault(_LOADED, {})[adapter_name] = (adapter_dir, adapter_configs(model).get(adapter_name))


def note_merged(model: nn.Module, names: list[str]) -> None:
    """At a merge of the adapters ``names``, before their configs go: the folder whose records the merged model
    carries from now on, the one adapter's that was loaded from a folder; none for a combination of several (no
    one run measured it) or an adapter made in this process."""
    if not names:  # nothing new folded in: the record stays
        return
    loaded = model.__dict__.get(_LOADED, {})
    configs = adapter_configs(model)
    folders = [folder for name, (folder, config) in loaded.items() if name in names and configs.get(name) is config]
    model.__dict__[_MERGED] = folders[0] if len(names) == 1 and len(folders) == 1 else None
    for name in names:
        loaded.pop(name, None)


def merged_folder(model: nn.Module) -> Path | None:
    """The folder of the adapter merged last into ``model`` (see :func:`note_merged`), or None."""
    return model.__dict__.get(_MERGED)
