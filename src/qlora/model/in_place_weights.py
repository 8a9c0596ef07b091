"""Adapters that train base modules in place cannot share a model with other adapters.

``trainable_token_indices`` (new rows of single tokens) are loaded into the model's own weights,
and so are ``modules_to_save`` (modules trained whole) of an adapter being trained (added by
``add_lora`` or loaded ``trainable``) or of an AdaLoRA adapter. A LoRA adapter loaded for use keeps
its modules as copies of its own instead (:class:`qlora.nn.SavedModules`, PEFT's
``ModulesToSaveWrapper``), which share a model with other adapters. With a second adapter on the
model, whichever wrote in place last would give its weights to every adapter (and to the base with
adapters off), so such a load is refused, not run wrong. (Biases trained with PEFT's
``bias="all"``/``"lora_only"`` are the base's own in PEFT too, shared by its adapters: allowed.)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UsageError
from .inject import adapter_configs, saved_module_layers


def in_place_parts(modules_to_save: list[str], trainable_tokens: list[str]) -> list[str]:
    """What an adapter writes into the base model, in words (empty: nothing)."""
    return ([f"{path} whole (modules_to_save)" for path in modules_to_save]
            + [f"new rows of {path} (trainable_token_indices)" for path in trainable_tokens])


def written_in_place(model: nn.Module, name: str) -> list[str]:
    """What adapter ``name`` of ``model`` wrote into the base (:func:`in_place_parts`): its token rows, and the
    modules it trained whole that are not copies of its own (:class:`qlora.nn.SavedModules`)."""
    config = adapter_configs(model)[name]
    copies = saved_module_layers(model)
    whole = [p for p in getattr(config, "modules_to_save", []) if name not in getattr(
        copies.get(p), "modules_to_save", ())]
    return in_place_parts(whole, list(getattr(config, "trainable_tokens", {})))


def in_place_adapter(model: nn.Module, but: str | None = None) -> tuple[str, list[str]] | None:
    """``(name, what it wrote)`` of the first adapter on ``model`` (other than ``but``) that wrote base
    weights in place, or None: with one loaded, the model with adapters off is not the base any more."""
    for name in adapter_configs(model):
        parts = written_in_place(model, name)
        if parts and name != but:
            return name, parts
    return None


def refuse_beside_others(model: nn.Module, adapter_dir: Path, adapter_name: str, parts: list[str]) -> None:
    """Refuse loading adapter ``adapter_name`` (writing ``parts`` in place) onto a model with other
    adapters, or any adapter onto a model whose adapter wrote base weights in place.

    Raises:
        UsageError: naming the adapter that writes in place and what it writes.
    """
    others = sorted(n for n in adapter_configs(model) if n != adapter_name)
    if not others:
        return
    found = (str(adapter_dir), parts) if parts else in_place_adapter(model, but=adapter_name)
    if found is None:
        return
    owner, what = found
    raise UsageError(
        f"cannot load {adapter_dir} as adapter {adapter_name!r} beside {others}: adapter {owner!r} trains "
        f"{', '.join(what)}, which qlora loads into the shared base model in place, so every adapter on it would "
        "run with those weights. Load that adapter on its own (a separate qlora generate/serve), or merge it "
        "(qlora merge) and use the merged model.")
