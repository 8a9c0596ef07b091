"""AdaLoRA adapters on disk in PEFT's format (``peft_type: "ADALORA"``).

PEFT saves ``lora_A`` ([r, in]), ``lora_B`` ([out, r]) and ``lora_E`` ([r, 1])
as bare parameters (``base_model.model.<path>.lora_E``, no ``.weight``) and,
once ranks are allocated, keeps only the surviving triplets: the file holds
``sum(rank_pattern[<path>.lora_E])`` rows per layer (possibly zero) and the
config the boolean masks, so a loader first shrinks each layer to its pattern.
The scale stays ``alpha / init_r`` (PEFT's ``ranknum`` is not saved).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_tensors import PEFT_PREFIX, copy_adapter_tensor, lora_key
from .adalora import AdaLoraConfig, adalora_layers, add_adalora
from .inject import adapter_configs, target_names


def adalora_state_dict(model: nn.Module, cfg: AdaLoraConfig, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, pruned triplets dropped once a rank pattern exists."""
    out = {}
    for path, layer in adalora_layers(model, adapter_name).items():
        a, b, e = layer.A.detach(), layer.B.detach(), layer.E.detach()
        if cfg.rank_pattern is not None and sum(cfg.rank_pattern[path]) != a.shape[0]:  # not yet shrunk (PEFT's test)
            keep = torch.tensor(cfg.rank_pattern[path], dtype=torch.bool, device=a.device)
            a, b, e = a[keep], b[:, keep], e[keep]
        out.update({f"{PEFT_PREFIX}{path}.lora_A": a, f"{PEFT_PREFIX}{path}.lora_B": b, f"{PEFT_PREFIX}{path}.lora_E": e})
    for path in cfg.modules_to_save:
        for name, param in model.get_submodule(path).named_parameters():
            out[f"{PEFT_PREFIX}{path}.{name}"] = param.detach()
    return out


def adalora_peft_config(cfg: AdaLoraConfig) -> dict:
    """adapter_config.json as PEFT's ``AdaLoraConfig`` writes it (rank_pattern keys ``<path>.lora_E``)."""
    s = cfg.schedule
    pattern = None if cfg.rank_pattern is None else {f"{p}.lora_E": keep for p, keep in cfg.rank_pattern.items()}
    return {
        "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.base_model_name_or_path,
        "init_r": s.init_r, "target_r": s.target_r, "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.deltaT,
        "beta1": s.beta1, "beta2": s.beta2, "orth_reg_weight": cfg.orth_reg_weight, "total_step": s.total_step,
        "rank_pattern": pattern, "r": 8, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules, "bias": "none", "fan_in_fan_out": cfg.fan_in_fan_out,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "use_dora": False, "revision": None,
        "layers_to_transform": None,
    } | ({"ensure_weight_tying": True} if cfg.ensure_weight_tying else {})


def attach_adalora(model: nn.Module, config: dict, paths: list[str], save_paths: list[str],
                   tensors: dict[str, torch.Tensor], adapter_name: str, trainable: bool, source: str) -> None:
    """Add the AdaLoRA adapter described by a PEFT config and fill it with ``tensors`` (PEFT keys)."""
    import re

    add_adalora(model, init_r=int(config["init_r"]), target_r=int(config["target_r"]), tinit=int(config["tinit"]),
                tfinal=int(config["tfinal"]), deltaT=int(config["deltaT"]), total_step=int(config["total_step"]),
                beta1=float(config["beta1"]), beta2=float(config["beta2"]),
                orth_reg_weight=float(config["orth_reg_weight"]), alpha=float(config["lora_alpha"]),
                dropout=float(config.get("lora_dropout") or 0.0), target_modules="|".join(map(re.escape, paths)),
                adapter_name=adapter_name, verbose=False, modules_to_save=save_paths,
                ensure_weight_tying=bool(config.get("ensure_weight_tying")))
    cfg: AdaLoraConfig = adapter_configs(model)[adapter_name]
    cfg.target_modules = target_names(config.get("target_modules"), paths)
    layers = adalora_layers(model, adapter_name)
    pattern = config.get("rank_pattern")
    if pattern:
        cfg.rank_pattern = {path: [bool(k) for k in pattern[f"{path}.lora_E"]] for path in layers}
        for path, layer in layers.items():
            layer.resize(cfg.rank_pattern[path])
    for key, value in tensors.items():
        if ".lora_" not in key:
            continue
        path, which = lora_key(key)
        copy_adapter_tensor(getattr(layers[path], which), value, key, source, trainable)
