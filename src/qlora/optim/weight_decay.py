"""Which trained parameters weight decay leaves alone: biases and normalization weights.

transformers' ``Trainer`` (so TRL, axolotl and LLaMA-Factory) gives AdamW two parameter groups: the weights,
decayed, and, with no decay, every parameter whose lower-cased path names a bias or a norm (``bias``,
``layernorm``, ``rmsnorm``, a ``norm`` or ``*_norm`` module) or that lies inside an ``nn.LayerNorm``
(``Trainer.get_decay_parameter_names``). Decay pulls a parameter towards 0: for a bias or a norm's scale that
moves what the layer computes instead of keeping the weights small. LoRA's factors are weights; the biases that
``--bias`` and ``--lora-bias`` train are not.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

# transformers' forbidden_name_patterns, searched in the parameter's lower-cased path
NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def no_decay_names(model: nn.Module) -> set[str]:
    """The paths of ``model``'s parameters that weight decay leaves alone, by transformers' rule."""
    in_layer_norm = {f"{path}.{name}" if path else name for path, module in model.named_modules()
                     if isinstance(module, nn.LayerNorm) for name, _ in module.named_parameters()}
    return {name for name, _ in model.named_parameters() if NO_DECAY_NAME.search(name.lower())} | in_layer_norm


def decay_groups(model: nn.Module, groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """``groups`` (optimizer parameter groups of ``model``'s parameters) each split in two, as transformers splits
    its one: the parameters to decay, with ``weight_decay``, then those :func:`no_decay_names` names, with none;
    empty groups are left out. Without decay, or with nothing to exempt, ``groups`` itself is returned."""
    names = no_decay_names(model) if weight_decay else set()
    exempt = {id(p) for name, p in model.named_parameters() if name in names}
    if not exempt:
        return groups
    out = []
    for group in groups:
        for decayed in (True, False):
            params = [p for p in group["params"] if (id(p) not in exempt) == decayed]
            if params:
                out.append({**group, "params": params, "weight_decay": weight_decay if decayed else 0.0})
    return out
