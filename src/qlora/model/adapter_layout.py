"""Adapters saved for a model's checkpoint layout rather than the module layout transformers 5 builds.

transformers 5 builds some models with modules other than their checkpoints' (:mod:`qlora.model.checkpoint_layout`):
renamed ones (Mixtral's ``block_sparse_moe`` is ``mlp``) and MoE experts fused into 3-D weights (each expert's
``w1`` and ``w3`` are rows of ``experts.gate_up_proj``). An adapter trained under transformers 4 names the old
modules (``...block_sparse_moe.experts.3.w1.lora_A.weight``); PEFT 0.21 maps it through the model's conversion
mapping when it loads it, and so does qlora: a renamed layer's tensors move to its new name, and LoRA on the
per-expert layers becomes LoRA on the 3-D expert weights (``target_parameters``, PEFT's layout), exactly. Expert
``e``'s factors of a weight concatenated from several (``gate_up = [w1; w3]``) are ``A = [A_w1; A_w3]`` and
``B = diag(B_w1, B_w3)``, of rank ``r_w1 + r_w3`` (a source without LoRA gives a zero block, where PEFT refuses
it); each 3-D weight gets the largest rank an expert needs (zero-padded) and one scale, each source's own (rank and
alpha patterns) folded into its block of B.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..nn import Experts4bit, ExpertsLora
from ..nn.experts4bit import experts_layout
from ..nn.experts_lora import expert_shapes, peft_transposed
from .adapter_tensors import PEFT_PREFIX, lora_key
from .checkpoint_layout import CheckpointLayout
from .inject import adaptable_router, expert_modules, pattern_key
from .quantize import matches_any

log = logging.getLogger("qlora")

_WRAPPED = re.compile(r"\.(token_adapter|modules_to_save|original_module)(\.|$)")  # PEFT's wrappers' own keys
_FUSIONS = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])  # experts stacked, then sources concatenated


def to_model_layout(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor],
                    adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter with the layers it names in the checkpoint layout moved to the model's
    (unchanged when every layer it names is the model's). Layers the mapping does not place are left for the
    caller's check (an adapter made for another model).

    Raises:
        UsageError: a per-expert layer the model fuses in a way this mapping does not cover, or with DoRA or a
            LoRA bias (expert weights have neither), naming the adapter and the tensor.
    """
    modules = dict(model.named_modules())
    by_path: dict[str, list[str]] = {}
    for key in tensors:
        if key.startswith(PEFT_PREFIX):
            path = lora_key(key)[0] if ".lora_" in key else key[len(PEFT_PREFIX):].rpartition(".")[0]
            by_path.setdefault(path, []).append(key)
    missing = [p for p in by_path if p not in modules and re.sub(r"(\.base_layer)+$", "", p) not in modules
               and not _WRAPPED.search(p)]
    if not missing:
        return config, tensors
    experts = expert_modules(model)
    model_keys = {f"{p}.weight" for p in modules} | {f"{p}.{w}" for p, m in experts.items()
                                                     for w in expert_shapes(_unwrapped_experts(m))}
    layout = CheckpointLayout(model, model_keys, [f"{p}.weight" for p in missing])
    tensors, fused, routers = dict(tensors), {}, []
    for path in missing:
        raw = f"{path}.weight"
        if layout.in_group(raw):
            fused[path] = layout.group(raw)
            continue
        new = layout.target(raw).removesuffix(".weight")
        if new != path and new in modules:
            for key in by_path[path]:
                tensors[key.replace(f"{PEFT_PREFIX}{path}.", f"{PEFT_PREFIX}{new}.", 1)] = tensors.pop(key)
            if adaptable_router(modules[new]):
                routers.append((path, new))
    if fused:
        if config.get("peft_type", "LORA") != "LORA":
            raise UsageError(f"{adapter_dir}: its {config.get('peft_type')} layers on per-expert modules "
                             f"({next(iter(fused))}) are fused into 3-D expert weights by this transformers; qlora "
                             "converts plain LoRA only. Load it with transformers 4.x, or merge it there.")
        config, tensors = _fuse_experts(config, tensors, fused, by_path, experts, adapter_dir)
    if routers:
        config = _onto_routers(config, routers, [p for p in by_path if p not in dict(routers)], adapter_dir)
    return config, tensors


def _onto_routers(config: dict, routers: list[tuple[str, str]], others: list[str], adapter_dir: Path) -> dict:
    """The config of an adapter whose LoRA on linear routers (``routers``: (checkpoint path, model path); transformers
    4.x's ``block_sparse_moe.gate``) lands on this model's routers, which are no linear layers: LoRA on their 2-D
    weights (``target_parameters``, as PEFT's all-linear writes it on transformers 5), each router's own rank and
    alpha kept under its weight's name (``others``: the adapter's other layers). The same tensors, the same delta
    ``s B A``."""
    config = dict(config)
    old = [p for p, _ in routers]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if isinstance(config.get("target_modules"), list):  # a name that adapted only routers is now a parameter's
        config["target_modules"] = [t for t in config["target_modules"] if not any(matches_any(p, [t]) for p in old)
                                    or any(matches_any(p, [t]) for p in others)]
    for patterns, field in ((ranks, "rank_pattern"), (alphas, "alpha_pattern")):
        own = {re.escape(f"{new}.weight"): patterns[key] for path, new in routers
               if (key := pattern_key(list(patterns), path)) is not None}
        if own:
            config[field] = dict(patterns) | own
    config["target_parameters"] = list(config.get("target_parameters") or []) + sorted(
        f"{n}.weight" for _, n in routers)
    _without_dropout(config, adapter_dir, "its LoRA on MoE routers becomes LoRA on their 2-D weights")
    return config


def _unwrapped_experts(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, ExpertsLora) else module


def _fuse_experts(config: dict, tensors: dict[str, torch.Tensor], fused: dict[str, tuple[str, object, str]],
                  by_path: dict[str, list[str]], experts: dict[str, nn.Module],
                  adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """LoRA of per-expert layers (``fused``: path -> (3-D weight key, converter, source pattern)) as PEFT's
    ``target_parameters`` tensors of those weights, and the config entries that select and size them."""
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora"))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def scale(rank: float, a: float) -> float:
        return a / (math.sqrt(rank) if rslora else rank)

    # (experts path, weight) -> {(expert, source index): (A, scaled B)}; sources: the converter's patterns
    parts: dict[tuple[str, str], dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]] = {}
    sources: dict[tuple[str, str], int] = {}
    for path, (target, converter, pattern) in sorted(fused.items()):
        ops = [type(op).__name__ for op in getattr(converter, "operations", ())]
        where, _, weight = target.rpartition(".")
        module = experts.get(where)
        dims = [getattr(op, "dim", None) for op in getattr(converter, "operations", ())]
        if ops not in _FUSIONS or dims != [0, 1][:len(dims)] or module is None or not _plain(module):
            raise UsageError(f"{adapter_dir} adapts {path}, a per-expert layer of the checkpoint layout that "
                             f"transformers builds into {target} by {', '.join(ops) or 'a conversion'}; qlora maps "
                             "LoRA onto such expert weights only where the experts are stacked and concatenated "
                             "along their output rows (Mixtral, Qwen2-MoE and their kin). Load the adapter with "
                             "transformers 4.x, or merge it there and give qlora the merged model.")
        kinds = {lora_key(k)[1] for k in by_path[path]}
        if kinds != {"A.weight", "B.weight"}:
            odd = sorted(kinds - {"A.weight", "B.weight"}) or sorted({"A.weight", "B.weight"} - kinds)
            raise UsageError(f"{adapter_dir} adapts {path} with lora_{odd[0]} beside its lora_A and lora_B, which "
                             f"LoRA on the 3-D expert weights transformers builds it into ({target}) cannot hold "
                             "(no DoRA, no LoRA bias there, as in PEFT). Load the adapter with transformers 4.x.")
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), f"{path}.weight")
        expert = int(found.group(1)) if found and found.groups() else -1
        count, (fan_in, fan_out) = _experts_count(module, weight), expert_shapes(_unwrapped_experts(module))[weight]
        n = len(converter.source_patterns)
        a, b = (tensors.pop(f"{PEFT_PREFIX}{path}.lora_{k}.weight") for k in "AB")
        own_r = ranks[k] if (k := pattern_key(ranks, path)) is not None else r
        own_alpha = alphas[k] if (k := pattern_key(alphas, path)) is not None else alpha
        if (not 0 <= expert < count or a.shape != (own_r, fan_in) or b.shape != (fan_out // n, own_r)
                or fan_out % n):
            raise UsageError(f"{adapter_dir} was made for another base model: its LoRA on {path} (A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}) does not fit expert {expert} of {target}, {count} experts of "
                             f"{fan_out} x {fan_in} (rank {own_r} by its config).")
        factor = scale(own_r, own_alpha) / scale(r, alpha)
        parts.setdefault((where, weight), {})[(expert, converter.source_patterns.index(pattern))] = (a, b * factor)
        sources[(where, weight)] = n
    rank_of: dict[tuple[str, str], int] = {}  # the largest rank a fused expert needs
    for target, held in parts.items():
        per_expert: dict[int, int] = {}
        for (expert, _), (a, _) in held.items():
            per_expert[expert] = per_expert.get(expert, 0) + a.shape[0]
        rank_of[target] = max(per_expert.values())
    new_keys: dict[str, torch.Tensor] = {}
    for where, module in experts.items():
        chosen = [w for w in expert_shapes(_unwrapped_experts(module)) if (where, w) in parts]
        for k, weight in enumerate(chosen):
            prefix = where + ".base_layer" * (len(chosen) - 1 - k)  # PEFT nests its wrappers in registration order
            a, b = _stacked(parts[(where, weight)], sources[(where, weight)], rank_of[(where, weight)],
                            _experts_count(module, weight), *expert_shapes(_unwrapped_experts(module))[weight])
            new_keys[f"{PEFT_PREFIX}{prefix}.lora_A.weight"], new_keys[f"{PEFT_PREFIX}{prefix}.lora_B.weight"] = a, b
    tensors |= new_keys
    converted = set(fused)
    kept = [p for p in by_path if p not in converted]
    config = dict(config)
    if isinstance(config.get("target_modules"), list):  # names that adapted only per-expert layers are gone
        config["target_modules"] = [t for t in config["target_modules"] if any(matches_any(p, [t]) for p in kept)]
    keep = {key: value for key, value in ranks.items() if any(pattern_key([key], p) for p in kept)}
    keep_alpha = {key: value for key, value in alphas.items() if any(pattern_key([key], p) for p in kept)}
    own = {re.escape(f"{where}.{weight}"): rank for (where, weight), rank in rank_of.items()}  # PEFT's key
    config["rank_pattern"] = own | keep
    config["alpha_pattern"] = {key: scale(r, alpha) * (math.sqrt(rank) if rslora else rank)
                               for key, rank in own.items()} | keep_alpha
    config["target_parameters"] = list(config.get("target_parameters") or []) + sorted(
        f"{where}.{weight}" for where, weight in parts)
    _without_dropout(config, adapter_dir, "its per-expert LoRA becomes LoRA on 3-D expert weights")
    log.info("%s: LoRA on %d per-expert layers (transformers 4.x names) mapped onto this model's 3-D expert weights "
             "%s", adapter_dir, len(fused), ", ".join(sorted({w for _, w in parts})))
    return config, tensors


def _plain(module: nn.Module) -> bool:
    """An experts module whose 3-D weights are ``(E, out, in)`` in PEFT's reading, which the fusion assumes."""
    base = _unwrapped_experts(module)
    layout = experts_layout(base)
    return bool(layout and layout.standard and not layout.is_transposed and not peft_transposed(base))


def _experts_count(module: nn.Module, weight: str) -> int:
    base = _unwrapped_experts(module)
    stored = getattr(base, weight)
    return len(stored) if isinstance(base, Experts4bit) else stored.shape[0]


def _stacked(held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], sources: int, rank: int, count: int,
             fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(rank * E, in)`` A and ``(out, rank * E)`` B of one 3-D weight: expert ``e``'s rows
    ``e*rank ..`` of A and strided columns ``e, e + E, ..`` of B, each source's block in turn, zeros elsewhere."""
    first = next(iter(held.values()))[0]  # on meta, shapes only (qlora estimate)
    a = torch.zeros(rank * count, fan_in, dtype=first.dtype, device=first.device)
    b = torch.zeros(fan_out, rank * count, dtype=first.dtype, device=first.device)
    rows = fan_out // sources
    for expert in range(count):
        offset = 0
        for source in range(sources):
            if (expert, source) not in held:
                continue
            part_a, part_b = held[(expert, source)]
            k = part_a.shape[0]
            a[expert * rank + offset: expert * rank + offset + k] = part_a
            b[source * rows:(source + 1) * rows, [(offset + j) * count + expert for j in range(k)]] = part_b.to(first.dtype)
            offset += k
    return a, b


def _without_dropout(config: dict, adapter_dir: Path, becomes: str) -> None:
    """Set the converted adapter's ``lora_dropout`` to 0, saying so: LoRA on a parameter (PEFT's
    ``target_parameters``) has no dropout."""
    if config.get("lora_dropout"):
        log.warning("%s: its lora_dropout (%s) is not applied: %s, which has no dropout (as in PEFT); this matters "
                    "only to training it further.", adapter_dir, config["lora_dropout"], becomes)
        config["lora_dropout"] = 0.0
