"""Several adapters on one base: switch, weight, concatenate, pick one per batch row, or delete.

Adapters are loaded side by side with ``load_adapter(model, path, adapter_name=...)``;
the 4-bit base is shared, never copied. Layers an adapter does not adapt run
the base alone for it. Modules an adapter trained whole (``modules_to_save``) are
copies of its own (:class:`qlora.nn.SavedModules`): the active adapter's copy runs,
or the original for an adapter without one.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..nn import AdaLoraLinear, ExpertsLora, LoraEmbedding, LoraLinear, LoraSpec, RouterLora
from .adalora import AdaLoraConfig
from .in_place_weights import written_in_place
from .inject import (AdapterConfig, adapter_configs, adapter_layers, check_adapter_name, embedding_lora_layers,
                     lora_layers, saved_module_layers)
from .saved_copies import delete_copies


def _check_names(model: nn.Module, names: Sequence[str | None]) -> None:
    known = adapter_configs(model)
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise UsageError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")


def _refuse_expert_adapters(model: nn.Module, names: list[str], what: str) -> None:
    experts = sorted({n for n in names if getattr(adapter_configs(model)[n], "target_parameters", None)})
    if experts:
        raise UsageError(f"{what} does not cover LoRA on expert or router weights (target_parameters), which "
                         f"adapters {experts} have; switch or weight them with set_adapters(...) instead.")


def set_adapters(model: nn.Module, weights: dict[str, float]) -> None:
    """Activate adapters with weights: the output is ``base + sum_a w_a * delta_a``; a module an
    adapter trained whole (``modules_to_save``) runs as its copy, unweighted.

    Raises:
        UsageError: unknown names; two adapters with copies of one module, or one such adapter with a
            weight other than 1 (a module trained whole is no delta to weight or add; PEFT runs one copy
            at a time too).
    """
    _check_names(model, list(weights))
    copies = saved_module_layers(model)
    for path, module in copies.items():
        own = [n for n, w in weights.items() if w != 0 and n in module.modules_to_save]
        if len(own) > 1 or any(weights[n] != 1 for n in own):
            raise UsageError(f"adapters {own} (weights {[weights[n] for n in own]}) trained {path} whole "
                             "(modules_to_save), a copy of its own each, which is no delta that can be weighted or "
                             "added: activate at most one of them, with weight 1.")
    for layer in adapter_layers(model):
        layer.set_active({n: w for n, w in weights.items() if n in layer.specs})
    for module in copies.values():
        module.set_active([n for n, w in weights.items() if w != 0])


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the only active adapter, at weight 1, as PEFT's ``set_adapter``: the others stay loaded but
    compute nothing until :func:`set_adapter` or :func:`set_adapters` activates them again (switching costs no load).

    Raises:
        UsageError: an unknown name.
    """
    set_adapters(model, {name: 1.0})


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer, freeing its tensors (PEFT's ``delete_adapter``); if it
    was active, the first remaining adapter becomes the active one, as in PEFT. The name can be loaded again.
    A layer no adapter is left on is its base module again, as a module no adapter keeps a copy of is: the model
    is the one before the adapter was added, so a later adapter may train that module whole (``modules_to_save``).

    Raises:
        UsageError: an unknown name, an adapter merged into the base, or one that wrote base weights in
            place (trainable tokens; ``modules_to_save`` of an adapter being trained or of AdaLoRA), which
            deleting could not give back. Copies of modules it trained whole are freed with it.
    """
    _check_names(model, [name])
    configs = adapter_configs(model)
    config = configs[name]
    if not isinstance(config, (AdapterConfig, AdaLoraConfig)):
        raise UsageError(f"adapter {name!r} is {type(config).__name__}'s; only LoRA, DoRA and AdaLoRA adapters can "
                         "be deleted")
    written = written_in_place(model, name)
    if written:
        raise UsageError(f"adapter {name!r} trained {', '.join(written)} in the base model itself, which deleting "
                         "it cannot give back; load the base model again instead.")
    layers = adapter_layers(model)
    merged = [layer for layer in layers if name in getattr(layer, "merged", ())]
    if merged:
        raise UsageError(f"adapter {name!r} is merged into the base; unmerge it before deleting it.")
    was_active = any(name in layer.active for layer in layers)
    discard_adapter(model, name)
    if was_active and configs:
        set_adapter(model, next(iter(configs)))


def discard_adapter(model: nn.Module, name: str) -> None:
    """Take out whatever adapter ``name`` put on ``model``, however far its loading got (:func:`delete_adapter`'s
    work without its checks; for a load that failed midway, before or after its config was recorded): its slots in
    every layer, its copies of modules trained whole and its config; each layer no adapter is left on becomes its
    base module again."""
    kinds = (LoraLinear, LoraEmbedding, ExpertsLora, RouterLora, AdaLoraLinear)
    for path, layer in [(p, m) for p, m in model.named_modules() if isinstance(m, kinds)]:
        if isinstance(layer, AdaLoraLinear):  # one adapter's layer
            if layer.adapter_name != name:
                continue
        else:
            if name in layer.specs:
                layer.delete_adapter(name)
            if layer.specs:
                continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    delete_copies(model, name)
    adapter_configs(model).pop(name, None)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row ``i`` uses adapter ``names[i]`` (None: the base alone).

    Each adapter runs on its rows only and the base once on the whole batch, so
    serving several adapters costs one base forward. The list must match the
    batch size of every forward inside the block (generation keeps it).
    """
    _check_names(model, names)
    _refuse_expert_adapters(model, [n for n in names if n is not None], "per-row adapters")
    layers = [*lora_layers(model).values(), *embedding_lora_layers(model).values(),
              *saved_module_layers(model).values(), *(m for m in model.modules() if isinstance(m, AdaLoraLinear))]
    for layer in layers:
        layer.row_adapters = list(names)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


@torch.no_grad()
def combine_adapters(model: nn.Module, weights: dict[str, float], new_name: str) -> None:
    """Add adapter ``new_name`` equal to ``sum_a w_a * delta_a`` by concatenation.

    In each layer ``A`` stacks the adapters' A rows and ``B`` their columns times
    ``w_a * scale_a`` (the new scale is 1: alpha = r = the sum of the ranks there,
    recorded per layer as PEFT's rank/alpha patterns where it differs), so ranks
    may differ and the result is exact; LoRA biases add up the same way.

    Raises:
        UsageError: unknown names, or a DoRA adapter (its row normalization is
            not linear in BA, so no concatenation equals the weighted sum).
    """
    _check_names(model, list(weights))
    _refuse_expert_adapters(model, list(weights), "concatenating adapters")
    configs = adapter_configs(model)
    if new_name in configs:
        raise UsageError(f"the model already has an adapter named {new_name!r}")
    check_adapter_name(new_name)
    whole = sorted(n for n in weights if any(n in m.modules_to_save for m in saved_module_layers(model).values()))
    if whole:
        raise UsageError(f"cannot concatenate adapters {whole}: they trained modules whole (modules_to_save), "
                         "which concatenated LoRA factors cannot hold; combine with set_adapters(...) instead.")
    dora = [n for n in weights if configs[n].spec.use_dora]
    if dora:
        raise UsageError(f"cannot concatenate DoRA adapters {dora}: the magnitude normalization is not linear in "
                         "the deltas; combine them with set_adapters(...) weights at run time instead.")
    specs = [configs[n].spec for n in weights]
    lora_bias = any(s.lora_bias for s in specs)
    paths = sorted({p for n in weights for p in configs[n].layers})
    layers = {**lora_layers(model), **embedding_lora_layers(model)}
    ranks = {path: sum(layers[path].specs[n].r for n in weights if n in layers[path].specs) for path in paths}
    r = max(ranks.values())
    for path in paths:
        layer, rank = layers[path], ranks[path]
        spec = LoraSpec(r=rank, alpha=float(rank), dtype=specs[0].dtype,
                        lora_bias=lora_bias and not isinstance(layer, LoraEmbedding))
        layer.add_adapter(new_name, spec)
        embedding = isinstance(layer, LoraEmbedding)
        a, b = (layer.lora_embedding_A[new_name], layer.lora_embedding_B[new_name]) if embedding else (
            layer.lora_A[new_name].weight, layer.lora_B[new_name].weight)
        a.zero_(), b.zero_()
        bias = None if embedding else layer.lora_B[new_name].bias
        if bias is not None:
            bias.zero_()
        start = 0
        for name, weight in weights.items():
            if name not in layer.specs or name == new_name:
                continue
            s = layer.specs[name]
            if embedding:
                a_n, b_n = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
            else:
                a_n, b_n = layer.lora_A[name].weight, layer.lora_B[name].weight
                if layer.lora_B[name].bias is not None:
                    bias += layer.lora_B[name].bias * (weight * s.scaling)
            a[start:start + s.r] = a_n
            b[:, start:start + s.r] = b_n * (weight * s.scaling)
            start += s.r
        for p in (a, b) if bias is None else (a, b, bias):
            p.requires_grad_(False)
    first = configs[next(iter(weights))]
    odd = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    configs[new_name] = AdapterConfig(LoraSpec(r=r, alpha=float(r), dtype=specs[0].dtype, lora_bias=lora_bias),
                                      sorted({t for n in weights for t in configs[n].target_modules}),
                                      any(configs[n].fan_in_fan_out for n in weights),
                                      first.base_model_name_or_path, paths, rank_pattern=odd,
                                      alpha_pattern={k: float(v) for k, v in odd.items()})
