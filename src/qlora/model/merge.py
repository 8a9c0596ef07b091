"""Fold adapters into the base and write plain 16-bit checkpoints.

``into="dequantized"`` replaces each 4-bit layer by a dense one holding
``dequant(W) + scale * B @ A``: the merged model reproduces the adapter
model's outputs (the base it was trained on is the dequantized one).
``into="requantized"`` quantizes that sum back to 4 bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_dir
from ..errors import UsageError
from ..float_dtype import float_dtype
from ..nn import AdaLoraLinear, Experts4bit, ExpertsLora, Linear4bit, LoraEmbedding, LoraLinear, RouterLora
from ..shard_size import DEFAULT_BYTES
from .adapter_sources import merged_folder, note_merged
from .chat_format import ChatFormat
from .image_pixels import PixelBounds
from .inference_files import save_records
from .inject import adapter_configs
from .quantize import kept_in_fp32, replace_modules
from .saved_copies import unwrap_saved_modules
from .shard_bar import shard_bar
from .tied_tables import shares_table, untie_config
from .transformers4_compat import readable_by_transformers_4
from .trained_tokens import trained_tokenization
from .turn_end_eos import add_turn_end_eos


def _dense(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool, dtype: torch.dtype) -> nn.Module:
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_f, in_f)
        layer.weight = nn.Parameter(weight.t().contiguous().to(dtype), requires_grad=False)
        layer.bias = nn.Parameter((bias if bias is not None else torch.zeros(out_f)).to(dtype), requires_grad=False)
        return layer
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


@torch.no_grad()
def folded_weight(module: nn.Module) -> tuple[torch.Tensor, nn.Module] | None:
    """``(dense float32 [out, in] weight, base layer)`` of a LoRA, AdaLoRA or 4-bit
    layer with its active adapters folded in; ``None`` for any other module."""
    if isinstance(module, LoraLinear):
        if module.merged and any(n in module.lora_magnitude_vector for n in module.active):
            module.unmerge()  # DoRA's fold needs the unmerged base
        return module.merged_weight(module.unmerged_active), module.base_layer
    if isinstance(module, AdaLoraLinear):
        return module.base_weight(torch.float32) + module.delta_weight(), module.base_layer
    if isinstance(module, Linear4bit):
        return module.dequantize(torch.float32), module
    return None


@torch.no_grad()
def folded_bias(module: nn.Module, base: nn.Module) -> torch.Tensor | None:
    """The bias of a folded layer: the base's, plus what its active ``lora_bias`` adapters add."""
    bias = getattr(base, "bias", None)
    delta = module.bias_delta(module.unmerged_active) if isinstance(module, LoraLinear) else None
    if delta is None:
        return None if bias is None else bias.detach()
    return (bias.detach().float() + delta).to(bias.dtype)


def _adapted(module: nn.Module) -> bool:
    return isinstance(module, (LoraLinear, LoraEmbedding)) and bool(module.unmerged_active)


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the merged model's output head is its embedding table: the two share one tensor and
    neither carries an active adapter (LoRA on either makes them differ once merged)."""
    return shares_table(model) and not any(
        _adapted(m) for m in (model.get_output_embeddings(), model.get_input_embeddings()))


def _unwrap_copies(model: nn.Module) -> None:
    """The modules adapters trained whole, as the active adapter runs them (:func:`unwrap_saved_modules`);
    a head or embedding that was the other's table and is now a copy of its own is recorded untied."""
    tied = shares_table(model, originals=True)
    unwrap_saved_modules(model)
    if tied and not shares_table(model):
        untie_config(model)


def _refuse_unmergeable(model: nn.Module) -> None:
    """Before anything is folded: a layer whose adapter bias has nowhere to go (:meth:`LoraLinear.bias_delta`)."""
    for path, m in model.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        try:
            m.bias_delta(m.unmerged_active)
        except ValueError:
            raise UsageError(f"{path}: the adapter trains a bias there (PEFT's lora_bias) but the layer has no "
                             "bias, so it cannot be merged into a plain checkpoint (PEFT refuses this merge too). "
                             "Use the adapter unmerged (qlora generate/serve --adapter) instead.") from None


def _is_conv1d(module: nn.Module, base: nn.Module) -> bool:
    return getattr(module, "fan_in_fan_out", False) or getattr(base, "from_conv1d", False)


def merged_tensors(model: nn.Module) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """The merged model's state dict as ``(key, shape, make)`` rows, ``make()``
    computing that one tensor on demand.

    Equal to ``merge(model).state_dict()`` (float32 for folded layers) without
    building it: a writer can stream a checkpoint one layer at a time, so the
    4-bit model plus one dense layer is all that is ever in memory. Tied
    parameters appear under each of their keys, as in ``state_dict``.
    """
    _refuse_unmergeable(model)
    _unwrap_copies(model)
    foldable = (LoraLinear, AdaLoraLinear, Linear4bit)
    rows: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    folded: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f + ".") for f in folded):
            continue
        prefix = f"{path}." if path else ""
        if isinstance(module, ExpertsLora):  # transformers' 3-D layout, expert deltas folded in
            folded.append(path)
            base = module.base_layer
            for name in module.shapes:
                rows.append((prefix + name, module.weight_shape(name), lambda m=module, n=name: m.merged_weight(n)))
            for name, t in base.named_parameters():  # biases, post-expert norm
                if name not in module.shapes:
                    rows.append((prefix + name, tuple(t.shape), lambda t=t: t.detach()))
            continue
        if isinstance(module, Experts4bit):  # transformers' layout, dequantized
            folded.append(path)
            for name in module.weight_names:
                rows.append((prefix + name, module.shapes[name],
                             lambda m=module, n=name: m.dequantize(n, torch.float32)))
            for name, t in module.named_parameters():  # biases, post-expert norm
                rows.append((prefix + name, tuple(t.shape), lambda t=t: t.detach()))
            continue
        if isinstance(module, RouterLora):  # the 16-bit router, its deltas folded into its weight
            folded.append(path)
            rows.append((prefix + "weight", tuple(module.base_layer.weight.shape), module.merged_weight))
            base = module.base_layer
            for name, t in list(base.named_parameters()) + [(n, b) for n, b in base.named_buffers(recurse=False)
                                                            if n not in base._non_persistent_buffers_set]:
                if name != "weight":
                    rows.append((prefix + name, tuple(t.shape), lambda t=t: t.detach()))
            continue
        if isinstance(module, LoraEmbedding):
            folded.append(path)
            names = module.unmerged_active
            rows.append((prefix + "weight", tuple(module.weight.shape), lambda m=module, n=names: m.merged_weight(n)))
            continue
        if isinstance(module, foldable):
            folded.append(path)
            base = module.base_layer if isinstance(module, (LoraLinear, AdaLoraLinear)) else module
            conv1d = _is_conv1d(module, base)
            shape = (module.in_features, module.out_features) if conv1d else (module.out_features, module.in_features)

            def weight(module=module, conv1d=conv1d) -> torch.Tensor:
                w = folded_weight(module)[0]
                return w.t().contiguous() if conv1d else w

            rows.append((prefix + "weight", shape, weight))
            bias = getattr(base, "bias", None)
            if bias is not None:
                rows.append((prefix + "bias", tuple(bias.shape), lambda m=module, b=base: folded_bias(m, b)))
            elif conv1d:  # a merged Conv1D always has a bias (see _dense)
                rows.append((prefix + "bias", (module.out_features,), lambda n=module.out_features: torch.zeros(n)))
            continue
        for name, t in list(module.named_parameters(recurse=False)) + [
                (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]:
            rows.append((prefix + name, tuple(t.shape), lambda t=t: t.detach()))
    return rows


@torch.no_grad()
def merge(model: nn.Module, into: str = "dequantized", dtype: torch.dtype | str | None = None) -> nn.Module:
    """Return ``model`` with its active adapters folded in (modified in place).

    Args:
        into: ``"dequantized"`` (dense 16-bit layers) or ``"requantized"`` (4-bit again).
        dtype: dtype of the dense layers, a torch float dtype or its name (default: each layer's compute dtype).
    """
    if into not in ("dequantized", "requantized"):
        raise UsageError(f"into must be 'dequantized' or 'requantized', got {into!r}")
    dtype = None if dtype is None else float_dtype(dtype, "dtype")

    _refuse_unmergeable(model)
    note_merged(model, _merging(model))
    _unwrap_copies(model)
    untie = shares_table(model) and not tied_embeddings(model)
    experts = [p for p, m in model.named_modules() if isinstance(m, (Experts4bit, ExpertsLora))]

    def make(path: str, module: nn.Module) -> nn.Module | None:
        if any(path.startswith(e + ".") for e in experts):
            return None  # the experts' own 4-bit layers and adapters go with them
        if isinstance(module, ExpertsLora):
            return _merge_experts(module, into, dtype)
        if isinstance(module, Experts4bit):
            return module.to_dense(dtype) if into == "dequantized" else None
        if isinstance(module, Linear4bit) and into != "dequantized":
            return None
        if isinstance(module, RouterLora):  # in the router's own dtype, as routers without adapters stay (DeepSeek-V3's
            base = module.base_layer  # fp32 one too: cast_merged keeps it so, and bf16 would round the merged delta)
            base.weight = nn.Parameter(module.merged_weight().to(base.weight.dtype), requires_grad=False)
            return base
        if isinstance(module, LoraEmbedding):  # a new table: a head tied to the old one keeps it
            base = module.base_layer
            merged = module.merged_weight(module.unmerged_active)
            base.weight = nn.Parameter(merged.to(dtype or base.weight.dtype), requires_grad=False)
            return base
        folded = folded_weight(module)
        if folded is None:
            return None
        w, base = folded
        conv1d = _is_conv1d(module, base)
        bias = folded_bias(module, base)
        if isinstance(base, Linear4bit):
            out_dtype = dtype or base.compute_dtype
            if into == "requantized":
                layer = Linear4bit(base.in_features, base.out_features, bias is not None, base.compute_dtype,
                                   base.quant_type, base.blocksize, base.double_quant, device=w.device)
                layer.set_weight(w)
                layer.from_conv1d = base.from_conv1d
                if bias is not None:
                    layer.bias.data.copy_(bias)
                return layer
            return _dense(w, bias, conv1d, out_dtype)
        out_dtype = dtype or base.weight.dtype
        return _dense(w, bias, conv1d, out_dtype)

    # Outer LoraLinear layers are replaced first; their Linear4bit children go with them.
    replace_modules(model, lambda p, m: make(p, m) if not p.endswith(".base_layer") else None)
    if untie:
        untie_config(model)
    adapter_configs(model).clear()
    return model


@torch.no_grad()
def cast_merged(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` but for the tensors its class keeps in fp32 at ``dtype`` (:func:`kept_in_fp32`:
    DeepSeek-V3's and GLM-4.5's router and expert-score bias), as transformers loads and saves them: rounded to
    bf16, the router would choose other experts than the adapter model did."""
    fp32 = kept_in_fp32(model, dtype)
    for path, module in model.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_floating_point():
                key = f"{path}.{name}" if path else name
                t.data = t.data.to(torch.float32 if fp32 is not None and fp32.search(key) else dtype)
    return model


def _merging(model: nn.Module) -> list[str]:
    """The adapters a merge folds in: the active ones not merged yet, of every layer."""
    names: dict[str, None] = {}
    for module in model.modules():
        if isinstance(module, (LoraLinear, LoraEmbedding, ExpertsLora, RouterLora)):
            names.update(dict.fromkeys(module.unmerged_active))
        elif isinstance(module, AdaLoraLinear):
            names[module.adapter_name] = None
    return list(names)


def _merge_experts(module: ExpertsLora, into: str, dtype: torch.dtype | None) -> nn.Module:
    """The experts module with its active expert adapters folded in: transformers' dense module
    (``dequantized``), or the 4-bit one quantized again from the merged weights (``requantized``)."""
    merged = {name: module.merged_weight(name) for name in module.shapes}
    base = module.base_layer
    if isinstance(base, Experts4bit):
        if into == "requantized":
            for name, w in merged.items():
                base.set_weight(name, w)
            return base
        dense = base.to_dense(dtype)
    else:
        dense = base
    for name, w in merged.items():
        old = dense._parameters[name]
        dense._parameters[name] = nn.Parameter(w.to(old.device, dtype or old.dtype), requires_grad=False)
    return dense


def save_merged(model: nn.Module, out_dir: str | Path, tokenizer=None, max_shard_bytes: int = DEFAULT_BYTES) -> Path:
    """Write a merged (dense) model as a standard transformers safetensors checkpoint, in files of at most
    ``max_shard_bytes`` (a larger tensor alone in one) listed by ``model.safetensors.index.json``.

    Where the adapter merged last was loaded from a folder (:func:`qlora.load_adapter`), what its run recorded
    there goes in too, as ``qlora merge`` writes it: its chat format (also as the tokenizer's template), image
    pixel bounds and the tokens its loss was measured on (``trained_tokens.json``), which qlora's generate, chat,
    eval and serve follow; and (given ``tokenizer``) the token that chat format ends an answer with joins the model's
    ``generation_config.eos_token_id`` (:mod:`~qlora.model.turn_end_eos`), so transformers, vLLM and TGI stop there.
    ``config.json`` and ``tokenizer_config.json`` are spelt as transformers 4 reads them too
    (:mod:`~qlora.model.transformers4_compat`)."""
    if any(isinstance(m, (Linear4bit, Experts4bit, ExpertsLora, RouterLora, LoraLinear, LoraEmbedding, AdaLoraLinear))
           for m in model.modules()):
        raise UsageError("save_merged needs a dense model: call qlora.merge(model) first")
    source = merged_folder(model)
    # read (and checked) before anything is written
    trained = ChatFormat.load(source) if source is not None else None
    bounds, tokenization = PixelBounds.load(source), trained_tokenization(source) if source is not None else {}
    if tokenizer is not None:
        add_turn_end_eos(getattr(model, "generation_config", None), tokenizer, trained,
                         tokenization.get("eot_tokens", ""))
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with atomic_dir(out_dir) as tmp, shard_bar(sum(t.nbytes for t in model.state_dict().values())):
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_bytes)
        if tokenizer is not None:
            own = tokenizer.chat_template
            if trained is not None:  # other tools loading the merged folder see the same format
                tokenizer.chat_template = trained.template
            try:
                tokenizer.save_pretrained(tmp)
            finally:
                tokenizer.chat_template = own
        readable_by_transformers_4(tmp)  # llama.cpp's converter, vLLM and TGI on transformers 4 read it next
        save_records(tmp, trained, bounds, tokenization)
    return Path(out_dir)
