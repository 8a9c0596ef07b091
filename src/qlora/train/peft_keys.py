"""axolotl's and LLaMA-Factory's keys of PEFT ``LoraConfig`` options, as the LoraConfig those tools build reads them.

axolotl passes ``peft_layers_to_transform``/``peft_layers_pattern`` with its ``lora_target_modules`` to PEFT, which
then adapts only the named layers of those decoder layers (the first numbered path component, or the number after
a pattern, is the layer's index): qlora adapts exactly those through a ``target_modules`` regex of whole paths.
``peft_init_lora_weights`` (only when set: false is PEFT's default, as axolotl passes only a set value) and its
``peft.loftq_config`` are qlora's ``init``; ``peft`` with the bitsandbytes backend is the NF4 base. Options qlora has
no counterpart for are refused by name, saying what to do instead. axolotl's ``lora_target_parameters`` without
``lora_target_modules`` (or ``lora_target_linear``) adapts the expert weights alone, as it builds the LoraConfig. LoRA+'s learning rate of embedding adapters
changes nothing where no embedding is adapted (both tools set it by default) and is passed over then.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qlora.errors import UsageError

# PEFT's init_lora_weights values that qlora initializes alike (and pissa_niter_K)
_INITS = ("gaussian", "pissa", "olora", "loftq")


def peft_option_keys(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """``loaded`` with those keys read into qlora's options (before :func:`qlora.train.foreign_keys.adapter_keys`,
    which reads ``adapter`` and ``load_in_4bit`` as ``peft`` may set them).

    Raises:
        UsageError: a value qlora has no equivalent for, naming the file, line and key.
    """
    out = dict(loaded)
    where = {k: f"{path} line {lines.get(k, '?')}" for k in loaded}
    _peft_block(out, lines, where)
    _init(out, lines, where)
    _layers(out, where)
    for key, why in _REFUSED.items():
        if out.get(key):
            raise UsageError(f"{where[key]}: {key} {_shown(out[key])}: {why}")
        out.pop(key, None)
    if out.get("peft_autocast_adapter_dtype") is False:
        raise UsageError(f"{where['peft_autocast_adapter_dtype']}: peft_autocast_adapter_dtype false: qlora keeps "
                         "adapter weights in float32 (PEFT's default autocast); remove the key.")
    out.pop("peft_autocast_adapter_dtype", None)
    _loraplus_embedding(out, where)
    _weight_tying(out, where)
    if (out.get("adapter") in ("lora", "qlora") and out.get("lora_target_parameters")
            and not out.get("lora_target_modules") and not out.get("lora_target_linear")):
        out["target_modules"] = "none"  # axolotl's LoraConfig then has target_modules [] beside them: experts only
        lines.setdefault("target_modules", lines.get("lora_target_parameters", 0))
    return out


_REFUSED = {
    "peft_layer_replication": "PEFT's layer replication (decoder layers stacked again, sharing base weights) has no "
                              "qlora counterpart; remove the key.",
    "peft_trainable_token_indices": "qlora trains new tokens' rows with the whole embeddings and output head "
                                    "(add_special_tokens: [...]); it does not train chosen rows of existing tokens. "
                                    "Remove the key, or add the tokens with add_special_tokens.",
    "additional_target": "LLaMA-Factory then trains those modules whole (PEFT's modules_to_save); qlora trains the "
                         "embeddings and output head whole only when add_special_tokens adds tokens, and no other "
                         "modules. Remove the key (or add tokens with add_special_tokens).",
    "create_new_adapter": "LLaMA-Factory merges adapter_name_or_path into the base and trains a new adapter on it; "
                          "do that in two steps: qlora merge --model BASE --adapter ADAPTER --output MERGED, then "
                          "train with model_name_or_path: MERGED (and no adapter_name_or_path).",
    "merge_lora": "qlora train writes the adapter; fold it into its base afterwards with qlora merge --model BASE "
                  "--adapter OUTPUT --output MERGED. Remove the key.",
}


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _peft_block(out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """axolotl's ``peft`` mapping: ``loftq_config`` (4 bits: LoftQ on qlora's NF4 base), ``backend: bnb`` with
    ``weight_dtype: nf4`` (the 4-bit base, as axolotl reads it: adapter qlora, load_in_4bit) and ``group_size`` (the
    NF4 block size)."""
    block = out.pop("peft", None)
    if block is None:
        return
    here = where["peft"]
    if not isinstance(block, dict):
        raise UsageError(f"{here}: peft is a mapping (loftq_config, backend, weight_dtype, group_size).")
    other = sorted(set(block) - {"loftq_config", "backend", "weight_dtype", "group_size"})
    if other:
        raise UsageError(f"{here}: peft {', '.join(other)}: not an axolotl peft setting qlora reads (loftq_config, "
                         "backend, weight_dtype, group_size); remove it.")
    if block.get("backend") not in (None, "bnb"):
        raise UsageError(f"{here}: peft backend {block['backend']!r}: qlora quantizes as bitsandbytes does (NF4); "
                         "set backend: bnb or remove it.")
    dtype = block.get("weight_dtype")
    if dtype is not None and not (dtype == "nf4" and block.get("backend") == "bnb"):
        raise UsageError(f"{here}: peft weight_dtype {dtype!r}: qlora's 4-bit base is bitsandbytes' NF4 (backend: "
                         "bnb, weight_dtype: nf4, or adapter: qlora with load_in_4bit: true); set those.")
    if dtype == "nf4":  # axolotl: adapter lora becomes qlora, load_in_4bit true unless set
        out.setdefault("load_in_4bit", True)
        lines.setdefault("load_in_4bit", lines.get("peft", 0))
        if out.get("adapter") == "lora":
            out["adapter"] = "qlora"
    if block.get("group_size") is not None:
        out["blocksize"] = block["group_size"]
        lines.setdefault("blocksize", lines.get("peft", 0))
    loftq = block.get("loftq_config")
    if loftq is not None:
        bits = loftq.get("loftq_bits", 4) if isinstance(loftq, dict) else loftq
        if bits != 4:
            raise UsageError(f"{here}: peft loftq_config loftq_bits {bits!r}: qlora's LoftQ initializes against its "
                             "4-bit base; set loftq_bits: 4.")
        out["init"] = "loftq"
        lines.setdefault("init", lines.get("peft", 0))


def _weight_tying(out: dict, where: dict[str, str]) -> None:
    """axolotl's ``peft_ensure_weight_tying`` (PEFT's ``ensure_weight_tying``): a tied embedding and head that are
    trained whole (grown by added tokens) stay one table, as qlora trains them either way
    (:mod:`qlora.model.tied_tables`). PEFT also ties the LoRA adapters of a tied embedding and head named as
    targets, which qlora does not: refused then."""
    if not out.pop("peft_ensure_weight_tying", None):
        return
    targets = out.get("lora_target_modules") or out.get("target_modules") or []
    targets = targets.split(",") if isinstance(targets, str) else targets
    tied = [str(t).strip() for t in targets if str(t).strip() in ("embed_tokens", "lm_head")]
    if tied:
        raise UsageError(f"{where['peft_ensure_weight_tying']}: peft_ensure_weight_tying true with LoRA on "
                         f"{', '.join(tied)}: PEFT then shares one adapter between a tied embedding and output "
                         "head, which qlora does not; leave them out of lora_target_modules (added tokens train "
                         "them whole, as one table), or remove the key.")


def _init(out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """axolotl's ``peft_init_lora_weights``: a set value is PEFT's ``init_lora_weights`` (true: its default)."""
    value = out.pop("peft_init_lora_weights", None)
    if not value or value is True:
        return
    if not isinstance(value, str) or not (value in _INITS or re.fullmatch(r"pissa_niter_\d+", value)):
        raise UsageError(f"{where['peft_init_lora_weights']}: peft_init_lora_weights {_shown(value)}: qlora "
                         "initializes adapters as PEFT's true (its default), gaussian, pissa, pissa_niter_K, olora "
                         "and loftq; choose one or remove the key.")
    out["init"] = value
    lines["init"] = lines.get("peft_init_lora_weights", 0)


def _layers(out: dict, where: dict[str, str]) -> None:
    """``peft_layers_to_transform`` (with ``peft_layers_pattern``) as a regex of the named layers in those layers."""
    indices = out.pop("peft_layers_to_transform", None)
    patterns = out.pop("peft_layers_pattern", None)
    if indices is None or indices == []:
        return  # PEFT reads layers_pattern only with layers_to_transform
    here = where["peft_layers_to_transform"]
    indices = [indices] if isinstance(indices, int) else indices
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in indices):
        raise UsageError(f"{here}: peft_layers_to_transform expects layer indices (a list of whole numbers).")
    if out.get("lora_target_linear"):
        raise UsageError(f"{here}: peft_layers_to_transform with lora_target_linear: true: qlora adapts some layers' "
                         "linears through a regex of the names listed; list them in lora_target_modules (q_proj, "
                         "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, ...) instead of lora_target_linear.")
    names = out.get("lora_target_modules")
    names = names.split(",") if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise UsageError(f"{here}: peft_layers_to_transform adapts the layers named in lora_target_modules within "
                         "those decoder layers; list the names there (q_proj, v_proj, ...).")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
    out["lora_target_modules"] = layer_regex([n.strip() for n in names], indices, patterns)


def layer_regex(names: list[str], indices: list[int], patterns: list[str]) -> str:
    """The whole module paths PEFT adapts for ``target_modules=names`` with ``layers_to_transform=indices`` and
    ``layers_pattern=patterns``, as one regex: a path ending in a name whose layer index is listed, the index being
    the first numbered component after two others (no pattern), or the number after the first pattern that occurs
    in the path (its first occurrence); a path equal to a name is matched as such."""
    wanted = "|".join(map(str, sorted(set(indices))))
    listed = "|".join(map(re.escape, names))
    tail = rf"\.(?:.*\.)?(?:{listed})"
    options = [listed]  # a path equal to a listed name is adapted whatever its layer (PEFT's exact match)
    if not patterns:
        options.append(rf"[^.]*\.[^.]*\.(?:(?!\d+\.)[^.]*\.)*?(?:{wanted}){tail}")
    for k, pattern in enumerate(patterns):  # none when no pattern is given
        earlier = "".join(rf"(?!(?:.*?\.)?(?:{p})\.\d+\.)" for p in patterns[:k])
        options.append(rf"{earlier}(?:(?!(?:{pattern})\.\d+\.)[^.]*\.)*?(?:{pattern})\.(?:{wanted}){tail}")
    return "|".join(f"(?:{o})" for o in options)


def _loraplus_embedding(out: dict, where: dict[str, str]) -> None:
    """LoRA+'s learning rate of embedding adapters: passed over unless LoRA+ trains an embedding adapter, whose
    factors qlora's LoRA+ gives the A and B rates."""
    if out.pop("loraplus_lr_embedding", None) is None or not out.get("loraplus_lr_ratio"):
        return
    targets = out.get("lora_target_modules", out.get("lora_target"))
    listed = targets.split(",") if isinstance(targets, str) else list(targets or [])
    if any("embed" in str(t) or "wte" in str(t) for t in listed):
        raise UsageError(f"{where['loraplus_lr_embedding']}: loraplus_lr_embedding with LoRA on an embedding: qlora's "
                         "LoRA+ trains embedding adapters' A at the learning rate and B at loraplus_lr_ratio times "
                         "it; remove the key, or the embedding from the targets.")
