"""4-bit checkpoints in transformers' bitsandbytes format.

``config.json`` gains a ``quantization_config`` (quant_method bitsandbytes,
load_in_4bit), and each 4-bit layer contributes ``weight`` plus its
``weight.absmax`` ... ``weight.quant_state.bitsandbytes__nf4`` entries, so
``AutoModelForCausalLM.from_pretrained`` with bitsandbytes installed loads it,
and :func:`qlora.load_model` loads checkpoints transformers wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import UsageError
from ..nn import Experts4bit, Linear4bit, LoraLinear, expert_weight, expert_weight_names
from ..shard_size import DEFAULT_BYTES
from .architecture import text_model_from_config
from .checkpoint_layout import converted_on_save, to_checkpoint_layout
from .quantize import is_conv1d, is_plain_linear, kept_dense_names, non_text_names, tied_keys, weight_count
from .transformers4_compat import readable_by_transformers_4


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model tensors (adapters left out), tied duplicates dropped.

    A tied tensor (lm_head tied to embed_tokens) is stored once, under the name transformers'
    ``save_pretrained`` keeps: the tie's source, whichever module registers first (XLM-RoBERTa's
    head comes before its embeddings)."""
    sd = model.state_dict()
    targets = set(tied_keys(model))
    kept: dict[int, str] = {}
    tied: set[str] = set()
    for key, param in model.named_parameters(remove_duplicate=False):
        first = kept.setdefault(id(param), key)
        if first == key:
            continue
        if first in targets and key not in targets:
            tied.add(first)
            kept[id(param)] = key
        else:
            tied.add(key)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key or key in tied:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().contiguous().cpu().clone()
    return out


_EXPERTS_4BIT = ("has its mixture-of-experts experts in 4 bits; transformers + bitsandbytes quantizes linear layers "
                 "only and reads experts (3-D weights) as 16-bit tensors, so no file of 4-bit experts loads there. "
                 "Load the model with quantize_experts=False (experts kept in the compute dtype, as transformers "
                 "keeps them) and save that: qlora quantizes those experts identically when it loads the file.")


def dense_expert_share(model: nn.Module) -> float:
    """The fraction of a model's weights that are 16-bit MoE experts, 0 for a dense model."""
    experts = sum(expert_weight(m, n).numel() for m in model.modules() for n in expert_weight_names(m)
                  if not isinstance(m, Experts4bit))
    total = weight_count(model)
    return experts / total if total else 0.0


def check_quantizable(model_dir: str | Path) -> None:
    """Refuse, before any weight is read, models whose 4-bit checkpoint transformers could not load:
    linear layers of an nn.Linear subclass (Falcon's FalconLinear), or layers the checkpoint stores
    fused into one tensor that loading splits (HRM's ``gqkv_proj``): packed 4-bit codes of the split
    layers cannot be joined back into the fused tensor's codes; or modules transformers rebuilds before it
    loads a 4-bit file (Llama 4's experts), whose rebuilt weights the file does not hold."""
    from .load import read_model_config

    config = read_model_config(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        return  # already 4-bit: re-saving it changes nothing about its experts
    with torch.device("meta"):
        model = text_model_from_config(config, model_dir)
    kept = kept_dense_names(model)
    subclasses = sorted({type(m).__name__ for n, m in model.named_modules()
                         if n not in kept and type(m) is not nn.Linear and is_plain_linear(m)})
    if subclasses:
        raise UsageError(f"{model_dir} builds its linear layers as {', '.join(subclasses)} (a subclass of nn.Linear); "
                         "transformers + bitsandbytes quantizes exact nn.Linear layers only and keeps these 16-bit, "
                         "so it could not load a 4-bit file of them. Skip `qlora quantize`: give the 16-bit model to "
                         "train/generate/eval/serve, which quantize these layers to 4 bits while loading.")
    rebuilt = sorted({type(m).__name__ for m in model.modules()} & _rebuilt_by_bitsandbytes_loading())
    if rebuilt:
        raise UsageError(f"{model_dir} has {', '.join(rebuilt)} modules, which transformers + bitsandbytes rebuilds as "
                         "one linear layer per expert when it loads a 4-bit file and then reads weights that neither "
                         "its own save_pretrained nor qlora writes (it fails there: 'normal_kernel_cpu' not "
                         "implemented for 'Byte'). Skip `qlora quantize`: give the 16-bit model to "
                         "train/generate/eval/serve, which quantize it to 4 bits while loading.")
    fused = converted_on_save(model, [f"{n}.weight" for n, m in model.named_modules()
                                      if n not in kept and is_plain_linear(m)])
    if fused:
        raise UsageError(f"{model_dir} stores some linear layers fused into one tensor that transformers splits "
                         f"when it loads the model (e.g. {fused[0]}); a 4-bit file of the split layers could not "
                         "be fused back, so neither transformers + bitsandbytes nor qlora could load it. Skip "
                         "`qlora quantize`: give the 16-bit model to train/generate/eval/serve, which quantize "
                         "these layers to 4 bits while loading.")


def _rebuilt_by_bitsandbytes_loading() -> set[str]:
    """The module classes transformers replaces before it loads a bitsandbytes 4-bit file (Llama 4's fused
    ``Llama4TextExperts`` by per-expert linear layers), from its own table; none where it has no such table."""
    try:
        from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION
    except ImportError:
        return set()
    return {name for name, entry in MODULES_TO_PATCH_FOR_QUANTIZATION.items()
            if "bitsandbytes" in {getattr(m, "value", m) for m in entry.get("quantization_methods", ())}}


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, max_shard_bytes: int = DEFAULT_BYTES) -> Path:
    """Write the 4-bit base model (without adapters) in bitsandbytes' checkpoint format, in the
    layout transformers' ``save_pretrained`` writes (MoE experts as 16-bit per-expert weights), in files of
    at most ``max_shard_bytes`` (a larger tensor alone in one). ``config.json`` and ``tokenizer_config.json`` are
    spelt as transformers 4 reads them too (:mod:`~qlora.model.transformers4_compat`).

    Raises:
        UsageError: for a model whose MoE experts are 4-bit (:class:`Experts4bit`): load it with
            ``quantize_experts=False``.
    """
    from safetensors.torch import save_file

    if any(isinstance(m, Experts4bit) for m in model.modules()):
        raise UsageError(f"this model {_EXPERTS_4BIT}")

    layers = [m.base_layer if isinstance(m, LoraLinear) else m for m in model.modules()]
    q = [m for m in layers if isinstance(m, Linear4bit)]
    if not q:
        raise UsageError("the model has no 4-bit layers to save; load it with quant='nf4' or 'fp4'")
    first = q[0]
    # the base's module paths: adapter layers' and saved-module wrappers' names left out, their copies skipped
    base_paths = {n: re.sub(r"\.(base_layer|original_module)\b", "", n) for n, _ in model.named_modules()
                  if ".lora_" not in n and ".modules_to_save." not in n}
    quantized_paths = {base_paths[n] for n, m in model.named_modules() if isinstance(m, Linear4bit) and n in base_paths}
    # what transformers would quantize if unnamed: nn.Linear and GPT-2's Conv1D
    dense = [base_paths[n] for n, m in model.named_modules()
             if (isinstance(m, nn.Linear) or is_conv1d(m)) and n in base_paths]
    dense = [n for n in dense if n not in quantized_paths]
    # Loaders match these as name suffixes: a leaf name is enough unless a quantized layer shares it
    # (Falcon-H1's dense mamba.out_proj beside quantized ones elsewhere), then full paths.
    quantized_leaves = {n.rsplit(".", 1)[-1] for n in quantized_paths}
    # A multimodal model's dense vision/audio towers are named as a whole (a module prefix).
    towers = tuple(t for t in non_text_names(model) if not any(q.startswith(t + ".") for q in quantized_paths))
    dense = [n for n in dense if not n.startswith(tuple(t + "." for t in towers))]
    skipped = sorted({n if n.rsplit(".", 1)[-1] in quantized_leaves else n.rsplit(".", 1)[-1] for n in dense}
                     | set(towers))
    # transformers' own serialization (what save_pretrained writes): the fields that differ from the defaults,
    # non-finite floats encoded, and not the local folder the model was read from (_name_or_path)
    config = json.loads(model.config.to_json_string(use_diff=True))
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": _dtype_name(first.compute_dtype), "bnb_4bit_quant_storage": "uint8",
        # Always a list, even empty: transformers reads None as "skip the output head and tied
        # layers", which would leave a head this file stores packed (a checkpoint whose head
        # bitsandbytes quantized) dense on load, and fail there on its shape.
        "llm_int8_skip_modules": skipped, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
    }
    sd = to_checkpoint_layout(model, quantized_state_dict(model))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in sd.items():
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                     "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        readable_by_transformers_4(tmp)  # vLLM and TGI on transformers 4 read it next
    return Path(out_dir)
