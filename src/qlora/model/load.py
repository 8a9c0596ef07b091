"""Load a transformers causal LM with its linear layers quantized while reading.

The model skeleton is built on the ``meta`` device (no memory), its linear
layers are swapped for empty :class:`~qlora.nn.Linear4bit` modules on the
target device, and the safetensors shards are then read one tensor at a time
(memory-mapped): a linear weight is quantized as soon as it is read and its
16-bit copy dropped, every other tensor is placed directly. Neither host RAM
nor GPU memory ever holds the whole model in 16 bits. Checkpoints already in
bitsandbytes' 4-bit format load their packed codes as they are (transformers 4.x's
per-expert 4-bit MoE layers joined into the experts' layers: :mod:`qlora.model.packed_experts`).

Where transformers' module layout differs from the checkpoint's (v5 MoE
experts as 3-D weights, renamed modules), keys are mapped and tensors
converted with transformers' own conversion mapping
(:mod:`qlora.model.checkpoint_layout`), one target at a time; MoE experts
become :class:`~qlora.nn.Experts4bit` (one 4-bit matrix per expert), routers
stay 16-bit.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
from torch import nn

from ..errors import UsageError
from ..float_dtype import float_dtype
from ..nn import Experts4bit, Linear4bit, expert_weight_names
from ..quant import NonFiniteError, QuantState, dequantize_4bit
from .architecture import check_runs_on_text, text_model_from_config
from .bnb_int8 import BnbInt8
from .checkpoint_layout import CheckpointLayout
from .compressed_tensors import CompressedTensors
from .foreign_checkpoints import foreign_checkpoint, gguf_file_error, is_gguf
from .gptq_awq import GroupedInt
from .local_path import looks_like_path, near_local_path
from .modelopt import ModelOpt
from .packed_experts import PackedExperts
from .quantize import (bnb_kept_names, checked_format, fp32_linear_names, is_conv1d, is_plain_linear, is_skipped,
                       kept_dense_names, kept_in_fp32, non_text_names, output_embedding_names, read_as_tensors_names,
                       replace_modules, tied_keys, weight_count)
from .shipped_code import model_code_error, tokenizer_code_error
from .stored_floats import DecodePlan, StoredFloats, StoredFormat
from .weight_files import LAYOUTS, indexed_files, open_weights, weight_files

log = logging.getLogger("qlora")
_TRANSFORMERS_V5 = importlib.util.find_spec("transformers.initialization") is not None


# A hub model's config, tokenizer (tokenizer.json / .model / vocab and merges / tiktoken) and chat
# templates (chat_template.jinja, additional_chat_templates/*.jinja); weights are fetched after them.
_HUB_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A local folder, or a hub id: downloaded when a hub is reachable, else from the local cache. Refusals name
    ``--model``, the option every command gives it with."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name_or_path}: {path} has no config.json; point --model at a transformers "
                             f"model folder (one written by save_pretrained).{foreign_checkpoint(path)}")
        return path
    if path.is_file() and is_gguf(path):
        raise UsageError(f"--model {name_or_path}: {gguf_file_error(path)}")
    if path.exists() or looks_like_path(str(name_or_path)):
        raise UsageError(f"--model {name_or_path}: the model path does not exist or is not a folder; give a local "
                         "model folder or a hub id such as meta-llama/Meta-Llama-3-8B.")
    from huggingface_hub import snapshot_download

    from .. import hub

    cache_only = hub.cache_only()  # no minute of retries against a hub that is not there
    try:
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=_HUB_SMALL_FILES, local_files_only=cache_only))
        # then only the weights transformers' layout names: not a second copy in another layout
        # (Mistral's consolidated.safetensors, 14 GB for a 7B model) that qlora would not read;
        # pickled .bin weights only for a repository without safetensors
        for index_name, single in LAYOUTS:
            index = folder / index_name
            weights = indexed_files(index) if index.is_file() else [single]
            folder = Path(snapshot_download(str(name_or_path), allow_patterns=weights, local_files_only=cache_only))
            if all((folder / w).is_file() for w in weights):
                break
        return folder
    except Exception as exc:  # network and hub errors come in many types
        near = near_local_path(name_or_path)
        if cache_only:
            raise hub.unreachable_error(f"--model {name_or_path}", "model", "a local model folder (one written by "
                                        "save_pretrained)", cache_checked=True, near=near) from None
        said = " ".join(str(exc).split())  # huggingface_hub's message runs over several lines
        raise UsageError(f"--model {name_or_path}: not a local folder, and it could not be fetched from the model hub "
                         f"({type(exc).__name__}: {said}). Check the name, log in with `hf auth login` for gated "
                         f"models, or download it elsewhere and pass the folder.{near}") from None


class WeightHook(Protocol):
    """Work done on linear weights as they are read (:class:`qlora.model.streamed_init.StreamedInit`: the
    LoftQ/PiSSA/OLoRA init of each adapted layer), so that it never needs the whole 16-bit model."""

    def prepare(self, model: nn.Module, device: torch.device) -> set[str]:
        """Called with the model skeleton (nothing read yet; the layers to quantize already empty
        :class:`~qlora.nn.Linear4bit` modules) and the device it loads on: the paths of the 4-bit layers
        whose weights go through the hook."""

    def __call__(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        """Layer ``path``'s ``[out, in]`` weight as a 16-bit load holds it (compute dtype, on the device);
        what it returns is quantized in its place."""


def _read_weight_keys(files: list[Path]) -> dict[Path, list[str]]:
    """Every weight file's tensor names (cheap: safetensors headers, memory-mapped pickles), so a
    corrupt or truncated file is named at once, before any tensor is read."""
    keys: dict[Path, list[str]] = {}
    for file in files:
        if not file.is_file():
            raise UsageError(f"{file} is missing (it is listed in the model's weight index).")
        with open_weights(file) as fh:
            keys[file] = list(fh.keys())
    return keys


def _stored_format(config, model_dir: Path) -> StoredFormat | None:
    """The format the checkpoint's weights are stored in when qlora decodes them while loading (FP8, MXFP4,
    compressed-tensors, ModelOpt, bitsandbytes 8-bit, GPTQ, AWQ), or None. Its ``quantization_config`` is then dropped:
    the model is built, and later saved, as a plain one."""
    qc = getattr(config, "quantization_config", None)
    source = str(model_dir / "config.json")
    if qc is None:  # releases that describe their quantization only in the quantizer's own file
        return _modelopt_file(model_dir / "hf_quant_config.json") or _side_file(model_dir)
    stored = _decoded_format(qc if isinstance(qc, dict) else qc.to_dict(), source)
    if stored is not None:
        del config.quantization_config
    return stored


def _decoded_format(qc: dict, source: str) -> StoredFormat | None:
    return (CompressedTensors.from_config(qc, source) or StoredFloats.from_config(qc, source)
            or ModelOpt.from_config(qc, source) or BnbInt8.from_config(qc, source)
            or GroupedInt.from_config(qc, source))


def check_quantization_readable(config, model_dir: Path) -> None:
    """Refuse, as loading does, a config.json whose ``quantization_config`` names weights qlora cannot read
    (HQQ, EETQ, ...): ``qlora estimate`` must not size a run that ``qlora train`` refuses.

    Raises:
        UsageError: naming the format and what to give instead.
    """
    qc = getattr(config, "quantization_config", None)
    if qc is not None and _decoded_format(qc if isinstance(qc, dict) else qc.to_dict(),
                                          str(model_dir / "config.json")) is None:
        _prequantized(config, model_dir)


def _modelopt_file(path: Path) -> ModelOpt | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        quantization = data["quantization"] if data.get("producer", {}).get("name", "modelopt") == "modelopt" else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path} is not ModelOpt's quantization description (a JSON object with \"quantization\"): "
                         f"{exc}. Download or copy the model again.") from None
    return ModelOpt.from_config({"quant_method": "modelopt", **quantization}, str(path)) if quantization else None


def _side_file(model_dir: Path) -> GroupedInt | None:
    """AutoGPTQ's ``quantize_config.json`` or AutoAWQ's ``quant_config.json``, for a config.json without them."""
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        path = model_dir / name
        if path.is_file():
            try:
                qc = json.loads(path.read_text())
                qc = {"quant_method": method, **qc} if isinstance(qc, dict) else None
            except ValueError:
                qc = None
            if qc is None:
                raise UsageError(f"{path} is not a JSON object describing the {method.upper()} quantization; "
                                 "download or copy the model again.")
            return GroupedInt.from_config(qc, str(path))
    return None


def bnb_4bit_config(config) -> dict | None:
    """``config``'s bitsandbytes 4-bit ``quantization_config`` as a dict (its quant type, double quantization and
    ``llm_int8_skip_modules`` say how the checkpoint is stored), or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "bitsandbytes")  # configs written before transformers named the method
    return qc if method == "bitsandbytes" and qc.get("load_in_4bit", qc.get("_load_in_4bit")) else None


def _packed_4bit_config(keys: dict[Path, list[str]]) -> dict | None:
    """The bitsandbytes 4-bit config of files holding its packed layers under a config that names no quantization:
    ``save_pretrained`` of a model :func:`load_model` quantized writes them so. Each packed layer says its quant
    type (``weight.quant_state.bitsandbytes__nf4``) and double quantization (``weight.nested_absmax``)."""
    names = [k for ks in keys.values() for k in ks]
    types = sorted({k.rsplit("__", 1)[1] for k in names if ".weight.quant_state.bitsandbytes__" in k})
    if not types:
        return None
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": types[0],
            "bnb_4bit_use_double_quant": any(k.endswith(".weight.nested_absmax") for k in names)}


def _attached_adapters_hint(keys: dict[Path, list[str]]) -> str:
    """Why a model saved with its LoRA layers in place (``save_pretrained`` after :func:`qlora.add_lora`) lacks
    the model's tensors: its keys are ``q_proj.base_layer.weight`` and ``q_proj.lora_A.default.weight``."""
    key = next((k for ks in keys.values() for k in ks if ".base_layer." in k and ".lora_" not in k), None)
    if key is None or not any(".lora_" in k for ks in keys.values() for k in ks):
        return ""
    return (f" It holds a model saved with LoRA layers attached ({key}, ...), as save_pretrained after add_lora "
            "writes it: save the adapter with qlora.save_adapter (and a 4-bit base with qlora.save_quantized), or "
            "fold it in with qlora.merge and qlora.save_merged.")


def _prequantized(config, model_dir: Path, keys: dict[Path, list[str]] | None = None) -> dict | None:
    """The checkpoint's bitsandbytes 4-bit ``quantization_config`` (or the one its packed tensors imply, from
    ``keys``: see :func:`_packed_4bit_config`), None for a 16/32-bit one (or one whose decoded format
    :func:`_stored_format` took).

    Raises:
        UsageError: for any other quantization (HQQ, EETQ, ...), whose weights qlora cannot read; the
            message says what to give it instead.
    """
    qc, stored = getattr(config, "quantization_config", None), bnb_4bit_config(config)
    if qc is None:
        return _packed_4bit_config(keys or {})
    if stored is not None:
        return stored
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "bitsandbytes")
    if method == "bitsandbytes":
        kind = "bitsandbytes with neither load_in_4bit nor load_in_8bit set"
    else:
        bits = qc.get("bits") or qc.get("w_bit")
        kind = f"{method!r}" + (f" ({bits}-bit)" if bits else "")
    raise UsageError(f"{model_dir / 'config.json'} describes a {kind} quantized checkpoint; qlora reads 16/32-bit "
                     "checkpoints and those in FP8 (quant_method fp8, fbgemm_fp8), MXFP4, compressed-tensors, "
                     "ModelOpt (NVFP4, FP8), GPTQ, AWQ and bitsandbytes (4- and 8-bit) formats only, and would "
                     "misread these weights. Give it the model's original 16/32-bit checkpoint instead (qlora "
                     "quantizes it to 4 bits while loading, or once with `qlora quantize`), or a bitsandbytes 4-bit "
                     "checkpoint of it "
                     "(BitsAndBytesConfig(load_in_4bit=True) then save_pretrained).")


_NOT_TOGETHER = "the weights and config.json do not belong together (one of them is damaged, or of another model)."


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, source: str) -> None:
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    old = module._parameters.get(name, module._buffers.get(name))
    if old is not None and old.shape != value.shape:
        raise UsageError(f"{source} has shape {tuple(value.shape)} where the model built from config.json "
                         f"expects {tuple(old.shape)}; the weights and config.json do not belong together (or the "
                         "layer is 4-bit packed without the quant state bitsandbytes stores beside it).")
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=False if old is None else old.requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(key)


def _empty_model():
    """Where the model skeleton is built: parameters on ``meta`` (nothing materialized twice).
    transformers 5 initializes non-persistent buffers (rotary frequencies, embedding scales,
    causal masks) in guarded initializers, so everything is built on ``meta`` and those buffers
    are computed later; transformers 4.x computes them only in ``__init__``, so there buffers are
    built for real (they are small) with its own ``init_empty_weights``, and its random initializers are
    skipped with its own ``no_init_weights``, as its ``from_pretrained`` does (some of them assign computed
    tensors to ``meta`` parameters, which fails: Bamba's ``A_log``)."""
    if _TRANSFORMERS_V5:
        return torch.device("meta")
    from transformers.integrations.accelerate import init_empty_weights
    from transformers.modeling_utils import no_init_weights

    stack = ExitStack()
    stack.enter_context(init_empty_weights(include_buffers=False))
    stack.enter_context(no_init_weights())
    return stack


def _materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies, Falcon-H1's muP vector...) are
    not in checkpoints: allocate them and let the model's own initializers
    compute them. Loaded tensors are flagged as initialized, which transformers'
    guarded initializers (v5 ``transformers.initialization``) respect, so only
    the new buffers are written; the owners' ancestors run too, because some
    models fill a layer's buffer from the model-level initializer. On transformers
    4.x the buffers were computed at construction (see :func:`_empty_model`) and
    are only moved to ``device``."""
    if not _TRANSFORMERS_V5:
        for module in model.modules():
            for b, t in module._buffers.items():
                if t is not None and t.device != device:
                    module._buffers[b] = t.to(device)
        return
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            t._is_hf_initialized = True
    owners: list[str] = []
    for name, module in model.named_modules():
        meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
        for b in meta:
            module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
        if meta:
            owners.append(name)
    run = set(owners)
    for name in owners:
        parts = name.split(".") if name else []
        run.update(".".join(parts[:i]) for i in range(len(parts)))
    modules = dict(model.named_modules())
    for name in sorted(run, key=lambda n: -(n.count(".") + bool(n))):  # children before parents
        _owning_model(modules, name)._init_weights(modules[name])


def _other_paths(model: nn.Module, replaced: set[str]) -> dict[str, str]:
    """``{other path: replaced path}`` for each replaced module that the model also holds under other names:
    transformers 4.x's Zamba runs one shared block object in all its hybrid layers, and its files may store the
    block's weights under any of their names; ``named_modules`` names such a module once."""
    at = {id(model.get_submodule(p)): p for p in replaced}
    return {n: at[id(m)] for n, m in model.named_modules(remove_duplicate=False)
            if id(m) in at and n != at[id(m)]}


def _owning_model(modules: dict[str, nn.Module], name: str) -> nn.Module:
    """The innermost ``PreTrainedModel`` holding module ``name``: its ``_init_weights`` is the one written
    for it (transformers dispatches so too; Gemma 3n's initializer reads attributes of the inner text model)."""
    from transformers import PreTrainedModel

    parts = name.split(".") if name else []
    for i in range(len(parts), 0, -1):
        owner = modules[".".join(parts[:i])]
        if isinstance(owner, PreTrainedModel):
            return owner
    return modules[""]


def _target_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch device (default: CUDA when available), refused by name when this torch cannot use it."""
    try:
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', ...): {exc}") from None
    if target.type == "cuda" and not (target.index or 0) < torch.cuda.device_count():
        raise UsageError(f"device {device!r}: this torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                         f"(torch.cuda.device_count()); give device='cpu' or an index below that.")
    return target


def load_model(
    name_or_path: str | Path,
    quant: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    skip_modules: str | Iterable[str] = ("lm_head",),
    attn_implementation: str | None = None,
    progress: bool | None = None,
    quantize_experts: bool = True,
    weight_hook: WeightHook | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM (4-bit unless ``quant=None``) and its tokenizer.

    Args:
        name_or_path: local model folder, or a hub id when a hub is reachable.
        quant: ``"nf4"``, ``"fp4"`` or ``None`` (16-bit, for LoRA without quantization; ``"none"``, the CLI's
            spelling, is the same); any letter case.
        double_quant, blocksize: see :func:`qlora.quant.quantize_4bit`. A checkpoint whose config
            has a bitsandbytes 4-bit ``quantization_config`` is loaded in the format it names
            (its packed codes as they are), whatever these say.
        compute_dtype: dtype of the matmuls and of every unquantized tensor (a torch dtype or its name,
            ``"bfloat16"``, ``"bf16"``, ...).
        device: target device (default: CUDA when available, else CPU).
        skip_modules: linear layers kept dense, by name or regex (one string is one name; ``None``: no others;
            the output head always is).
        attn_implementation: forwarded to transformers ("eager", "sdpa", ...).
        progress: show a progress bar (default: for checkpoints over 1 GB).
        quantize_experts: quantize MoE experts stored as 3-D weights (from their ``compute_dtype``
            values); False keeps them in ``compute_dtype``, as transformers + bitsandbytes does
            (``qlora quantize`` writes them so).
        weight_hook: transforms the weights of the 4-bit layers it names before they are quantized, one at a
            time as they are read (a checkpoint stored 4-bit is not passed to it).

    Returns:
        ``(model, tokenizer)``; every base parameter is frozen.

    Raises:
        UsageError: missing folder or files, unsupported checkpoint, an option that is not one of its values.
    """
    from safetensors import SafetensorError

    if isinstance(quant, str) and quant.strip().lower() in ("nf4", "fp4", "none"):
        quant = None if quant.strip().lower() == "none" else quant.strip().lower()
    if quant not in ("nf4", "fp4", None):
        raise UsageError(f"quant must be nf4, fp4 or none, got {quant!r}")
    compute_dtype = float_dtype(compute_dtype, "compute_dtype")
    blocksize, double_quant = checked_format(blocksize, double_quant)
    skip_modules = (skip_modules,) if isinstance(skip_modules, str) else tuple(skip_modules or ())
    device = _target_device(device)
    model_dir = resolve_model_dir(name_or_path)
    files = weight_files(model_dir)
    config = read_model_config(model_dir)
    # a format qlora does not read is named before its files are opened: torchao's pickles hold objects
    # that weights_only refuses, which would hide what the checkpoint is
    check_quantization_readable(config, model_dir)
    keys = _read_weight_keys(files)  # headers only: a corrupt file fails here, before any tensor is read
    stored = _stored_format(config, model_dir)
    plan = DecodePlan(stored, keys)
    if quant is not None and getattr(stored, "requantized", None):
        log.warning("qlora: %s", stored.requantized)
    prequant = _prequantized(config, model_dir, keys)
    if prequant is not None:
        quant = prequant.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default
        double_quant = bool(prequant.get("bnb_4bit_use_double_quant", False))
        skip_modules = tuple(prequant.get("llm_int8_skip_modules") or skip_modules)
        if hasattr(config, "quantization_config"):  # implied by the packed tensors when absent
            del config.quantization_config
    tokenizer = load_tokenizer(model_dir)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(rows, int):  # checked before the (slow) weight load
        check_vocab_fits(tokenizer, rows, model_dir)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with _empty_model():
        model = text_model_from_config(config, model_dir, dtype=compute_dtype, **kwargs)
    check_runs_on_text(model, model_dir)
    if attends_to_later_tokens(config):  # said of a model qlora runs, not before refusing one (Evolla's config)
        log.warning("qlora: %s/config.json says is_decoder: false, so this %s model attends to later tokens: "
                    "trained as a causal LM it learns to copy the next token, and it decodes unlike its training. "
                    "Set \"is_decoder\": true in config.json to make it a causal LM (transformers' own advice "
                    "for its causal-LM head).", model_dir, config.model_type)

    fp32 = kept_in_fp32(model, compute_dtype)
    skip = set(skip_modules) | kept_dense_names(model) | fp32_linear_names(model, compute_dtype) | bnb_kept_names(model)
    dense_keys = set(model.state_dict().keys())
    layout = CheckpointLayout(model, dense_keys, plan.keys())
    # A 4-bit checkpoint says itself which layers are packed: its skip list may be spelled for
    # another transformers version, and bitsandbytes may have packed layers qlora keeps dense.
    packed = _packed_layers(keys, layout, dense_keys, model) if prequant is not None else set()
    # A config naming bitsandbytes 4-bit over files with no packed layer: 16/32-bit weights under a config
    # copied or kept over a dense save, or a model none of whose layers transformers quantizes (Falcon's
    # FalconLinear: transformers + bitsandbytes packs exact nn.Linear and Conv1D layers only). Either way
    # quantized while loading as transformers + bitsandbytes quantizes with that config.
    as_transformers = prequant is not None and not packed
    read_directly = read_as_tensors_names(model)
    if as_transformers:
        prequant = None

    def make(path: str, module: nn.Module) -> nn.Module | None:
        if quant is None:
            return None
        if expert_weight_names(module):  # MoE experts as 3-D weights (transformers v5): bitsandbytes keeps them
            if not quantize_experts or is_skipped(path, skip):  # 16-bit even in its 4-bit files, so they are
                return None                                   # quantized here
            return Experts4bit(module, compute_dtype=compute_dtype, quant_type=quant, blocksize=blocksize,
                               double_quant=double_quant, device=device)
        if not (is_plain_linear(module) or is_conv1d(module)):
            return None
        if as_transformers and not (type(module) is nn.Linear or is_conv1d(module)):
            return None
        if path not in packed or path in read_directly if prequant is not None else is_skipped(path, skip):
            return None  # packed but read by the model as a tensor (4.x Jamba's dt_proj): decoded (packed_dense)
        in_f, out_f = (module.weight.shape if is_conv1d(module) else (module.in_features, module.out_features))
        layer = Linear4bit(in_f, out_f, bias=module.bias is not None, compute_dtype=compute_dtype,
                           quant_type=quant, blocksize=blocksize, double_quant=double_quant, device=device)
        layer.from_conv1d = is_conv1d(module)
        return layer

    quantized = set(replace_modules(model, make))
    experts_paths = {p for p in quantized if isinstance(model.get_submodule(p), Experts4bit)}
    hooked = weight_hook.prepare(model, device) if weight_hook is not None and prequant is None else set()
    expected = set(model.state_dict().keys())
    pending_qstate: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    loaded: set[str] = set()
    total = sum(f.stat().st_size for f in files)
    bar = _progress(total, progress)

    aliases = _other_paths(model, quantized)
    # packed in the file, a plain tensor in this model (4.x's nn.Linear MoE router, transformers 5's router
    # parameter): decoded once its quant state is read
    packed_dense = {p for p in packed - quantized if f"{p}.weight" in expected}

    def place(key: str, tensor: torch.Tensor, source: str) -> None:
        """Put one checkpoint tensor (already in model naming and layout) into the model."""
        if aliases:  # a shared module stored under another of its names (4.x's Zamba): read under the one replaced
            alias = next((p for p in (key.rpartition(".")[0], key.rsplit(".weight.", 1)[0]) if p in aliases), None)
            key = aliases[alias] + key[len(alias):] if alias is not None else key
        module_path, _, leaf = key.rpartition(".")
        owner = next((p for p in (module_path, key.rsplit(".weight.", 1)[0]) if p in quantized or p in packed_dense),
                     None)
        # an Experts4bit's weight may sit deeper in it (DBRX's experts.mlp.w1)
        parts = key.split(".")
        in_experts = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
                           if p in experts_paths), None)
        if in_experts is not None:
            owner, leaf = in_experts, key[len(in_experts) + 1:]
            experts: Experts4bit = model.get_submodule(owner)
            if leaf in experts.weight_names:
                try:  # from the compute-dtype values, whether the file holds them fused or per expert
                    experts.set_weight(leaf, tensor.to(device, compute_dtype))
                except NonFiniteError as exc:
                    raise UsageError(f"{source} (module {owner}): {exc}") from None
                except ValueError as exc:  # a shape the experts built from config.json do not have
                    raise UsageError(f"{source} (module {owner}): {exc}; {_NOT_TOGETHER}") from None
                loaded.add(key)
                return
            owner = None  # biases, norms: ordinary tensors below
        if owner is not None and key.startswith(owner + ".weight"):
            layer: Linear4bit = model.get_submodule(owner)
            if prequant is not None:
                pending_qstate[owner][key[len(owner) + 1:]] = tensor
            else:
                w = tensor.to(device)
                w = w.t() if layer.from_conv1d else w
                if owner in hooked:
                    w = weight_hook(owner, w.to(compute_dtype))
                try:
                    layer.set_weight(w)
                except NonFiniteError as exc:
                    raise UsageError(f"{source} (module {owner}): {exc}") from None
                except ValueError as exc:  # a shape the layer built from config.json does not have
                    raise UsageError(f"{source} (module {owner}): {exc}; {_NOT_TOGETHER}") from None
            loaded.add(owner + ".weight")
            return
        if key not in expected:
            return  # e.g. legacy rotary buffers, or tied duplicates
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32 if fp32 is not None and fp32.search(key) else compute_dtype)
        # copy=True: never keep a view into the memory-mapped shard,
        # which would keep the whole file mapped (and counted in RSS).
        _set_tensor(model, key, tensor.to(device, copy=True), source)
        loaded.add(key)

    # transformers 4.x's per-expert 4-bit layers, joined into the 3-D expert weights' 4-bit layers (a layout
    # transformers converts: never under 4.x itself, whose experts are the per-expert layers)
    joined = None
    if prequant is not None and layout.converts:
        try:
            joined = PackedExperts(layout, [k for ks in keys.values() for k in ks],
                                   lambda target: _experts_weight(model, target, experts_paths))
        except ValueError as exc:
            raise UsageError(f"{model_dir}: the checkpoint lacks 4-bit expert layers: {exc}; is it complete, and "
                             "the checkpoint of this config?") from None
    # One shard is open (memory-mapped) at a time: an open mapping keeps the pages read so far in RSS.
    current: dict[Path, object] = {}

    def read(file: Path, raw_key: str) -> torch.Tensor:
        try:
            if file in current:
                tensor = current[file].get_tensor(raw_key)
            else:  # a converted group that spans shards: this one tensor from an earlier shard, copied
                with open_weights(file) as other:
                    tensor = other.get_tensor(raw_key).clone()
        except (SafetensorError, RuntimeError) as exc:
            raise UsageError(f"{file}: tensor {raw_key} is corrupt ({exc}). Download or copy the model "
                             "again.") from None
        bar.update(tensor.numel() * tensor.element_size())
        return tensor

    cast = compute_dtype if prequant is None else None
    for file in files:
        with open_weights(file) as fh:
            current[file] = fh
            for raw_key, parts in plan.in_file(file):  # a tensor once its last stored part (scale) is here
                if joined is not None and raw_key in joined:
                    for stem in joined.add(raw_key, read(file, raw_key)):
                        try:
                            if not joined.joinable(stem):  # decoded, converted as a 16-bit file's, quantized again
                                decoded = joined.decoded(stem, torch.float32)
                                for key, tensor in layout.add(stem, lambda t=decoded: t).items():
                                    place(key, tensor, f"{model_dir}: {key}")
                                continue
                            loaded.update(joined.loaded_targets(stem))
                        except ValueError as exc:
                            raise UsageError(f"{model_dir}: the 4-bit expert layer {stem} cannot be read: {exc}. "
                                             "The checkpoint is incomplete or was not written by transformers + "
                                             "bitsandbytes; copy or download it again.") from None
                    continue
                if layout.in_group(raw_key):  # read once its group is complete, then converted
                    converted = layout.add(raw_key, lambda r=raw_key, p=parts: _cast(plan.decode(r, p, read), cast))
                    for key, tensor in converted.items():
                        place(key, tensor, f"{model_dir}: {key}")
                    continue
                key = _model_key(layout.target(raw_key), expected, model)
                tensor = plan.decode(raw_key, parts, read)
                if len(parts) > 1 and getattr(stored, "linear_layout", False) and _is_conv1d_weight(model, key):
                    tensor = tensor.t()  # decoded as nn.Linear's [out, in]; GPT-2's Conv1D holds [in, out]
                place(key, tensor, f"{file}: tensor {raw_key}")
            current.clear()
    missing = layout.incomplete() + (joined.unread() if joined is not None else [])
    if missing:
        raise UsageError(f"{model_dir}: the checkpoint lacks some of the tensors that make "
                         f"{', '.join(missing[:3])}; is it complete?")
    bar.close()
    for owner, parts in pending_qstate.items():
        layer = model.get_submodule(owner)
        qs = {k[len("weight."):]: v for k, v in parts.items() if k.startswith("weight.")}
        try:
            if "weight" not in parts:
                raise ValueError(f"its packed weight is missing; found only {', '.join(sorted(qs))}")
            if owner in packed_dense:
                key = f"{owner}.weight"
                dtype = torch.float32 if fp32 is not None and fp32.search(key) else compute_dtype
                weight = dequantize_4bit(parts["weight"], QuantState.from_dict(qs), torch.float32)
                _set_tensor(model, key, weight.to(device, dtype), f"{model_dir}: {key}")
                continue
            layer.load_quant_state(parts["weight"], QuantState.from_dict(qs, device=device))
        except ValueError as exc:
            raise UsageError(f"{model_dir}: the 4-bit layer {owner} cannot be read: {exc}. The checkpoint is "
                             "incomplete or was not written by transformers + bitsandbytes; copy or download it "
                             "again, or load its 16-bit original.") from None
    _tie_towards_stored(model, quantized, loaded)
    model.tie_weights()
    _share_tied_4bit(model, quantized, loaded)
    _load_generation_config(model, model_dir)
    _materialize_buffers(model, device)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    for path in sorted(quantized):  # 4-bit weights are buffers: is_meta cannot tell they were never read
        module = model.get_submodule(path)
        names = module.weight_names if isinstance(module, Experts4bit) else ("weight",)
        still_meta += [f"{path}.{n}" for n in names if f"{path}.{n}" not in loaded]
    if still_meta:
        raise UsageError(f"{model_dir}: the checkpoint lacks {len(still_meta)} tensors the model needs, e.g. "
                         f"{', '.join(still_meta[:3])}; is it the checkpoint of this config?"
                         + _attached_adapters_hint(keys))
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if quant is not None and quantize_experts:  # experts kept dense on purpose: the caller knows
        _warn_dense_bulk(model)
    # Recorded in adapters as base_model_name_or_path: an absolute path for a local folder (a relative
    # one breaks once the adapter is used from another folder), a hub id as given.
    local = Path(name_or_path).expanduser()
    model.name_or_path = str(local.resolve()) if local.is_dir() else str(name_or_path)
    return model, tokenizer


def _warn_dense_bulk(model: nn.Module) -> None:
    """Say so when over a quarter of the weights stays 16-bit outside embeddings, head and vision towers
    (experts in a layout qlora does not know, layers the model's code reads as tensors: RWKV's): the user
    would otherwise learn it from an out-of-memory error."""
    skip = tuple(n + "." for n in non_text_names(model) | output_embedding_names(model))
    skip += tuple(n + "." for n, m in model.named_modules() if isinstance(m, (nn.Embedding, Linear4bit, Experts4bit)))
    total = weight_count(model)
    dense: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.is_floating_point() and not name.startswith(skip):
            dense[type(model.get_submodule(name.rpartition(".")[0])).__name__] += p.numel()
    if total and sum(dense.values()) > 0.25 * total:
        kinds = ", ".join(sorted(dense, key=dense.get, reverse=True)[:3])
        log.warning("qlora: %.0f%% of this model's weights stay 16-bit (in %s): experts in a layout qlora does "
                    "not quantize, or layers whose weight the model's own code reads or changes directly. The "
                    "4-bit saving is that much smaller; `qlora estimate` shows the memory this takes.",
                    100 * sum(dense.values()) / total, kinds)


def _tie_towards_stored(model: nn.Module, quantized: set[str], loaded: set[str]) -> None:
    """A file may store a tied tensor under the tie's target name only (XLM-RoBERTa's
    ``lm_head.decoder.weight``, which its model registers first); ``from_pretrained`` then ties towards
    the stored name. Give the source those values, so ``tie_weights`` (target := source) keeps them.
    4-bit layers are :func:`_share_tied_4bit`'s."""
    for target, source in tied_keys(model).items():
        if target in loaded and source not in loaded and source.rpartition(".")[0] not in quantized:
            _set_tensor(model, source, model.get_parameter_or_buffer(target).detach(), target)
            loaded.add(source)


def _share_tied_4bit(model: nn.Module, quantized: set[str], loaded: set[str]) -> None:
    """Give a 4-bit layer that transformers ties to another (Zamba's hybrid layers all run one shared
    transformer block, stored once) that layer's codes and constants. ``tie_weights`` ties parameters
    by name, and a 4-bit weight is several tensors; the layers stay separate modules, as in
    transformers, so each gets its own adapter as PEFT gives it."""
    for target, source in tied_keys(model).items():
        into, _, leaf = target.rpartition(".")
        owner = source.rpartition(".")[0]
        if leaf != "weight" or into not in quantized or owner not in quantized:
            continue
        if into + ".weight" in loaded and owner + ".weight" not in loaded:  # the checkpoint kept the other one
            into, owner = owner, into
        src = model.get_submodule(owner)
        model.get_submodule(into).load_quant_state(src._quant_tensor("weight"), src.quant_state)
        loaded.add(into + ".weight")


def _load_generation_config(model: nn.Module, model_dir: Path) -> None:
    """The checkpoint's generation_config.json (its EOS ids: Llama 3 Instruct lists three, sampling
    defaults), as ``from_pretrained`` reads it; ``from_config`` alone derives one from config.json."""
    if not (model_dir / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{model_dir / 'generation_config.json'} could not be read ({exc}); fix or remove it.") from None


def attends_to_later_tokens(config) -> bool:
    """An encoder family (BERT, RoBERTa, ELECTRA...) whose config leaves ``is_decoder`` false: its
    causal-LM head then attends both ways. (transformers 5 gives ``is_decoder`` only to the configs
    that read it; under 4.x every config has one and this says False.)"""
    text = config.get_text_config()
    return (getattr(text, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False)
            and "is_decoder" in inspect.signature(type(text).__init__).parameters)


def read_model_config(model_dir: str | Path):
    """The transformers config of a local model folder (or of its config.json).

    Raises:
        UsageError: config.json missing, not JSON, without a known model_type, or with a value of the wrong
            type or a size that is not positive.
    """
    from transformers import AutoConfig

    try:  # transformers' typed config fields (a str for an int) raise this
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, without typed configs
        StrictDataclassError = TypeError
    path = Path(model_dir) if Path(model_dir).is_file() else Path(model_dir) / "config.json"
    try:  # never transformers' question on the terminal, nor code from the folder (see shipped_code)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError, StrictDataclassError) as exc:
        custom = (model_code_error(path) or unknown_type_error(path)) if isinstance(exc, ValueError) else None
        if custom is not None:
            raise custom from None
        raise UsageError(f"{path} could not be read as a transformers config "
                         f"({' '.join(str(exc).split())[:300] or type(exc).__name__}).") from None
    return check_model_config(config, path)


def unknown_type_error(config_file: Path) -> UsageError | None:
    """Why ``config_file`` names no architecture this transformers has (a model newer than it, or a misspelt
    ``model_type``), or None when its ``model_type`` is one transformers knows. transformers' own message, cut to
    fit, ended in the middle of its advice."""
    import difflib

    import transformers
    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return None
    near = difflib.get_close_matches(model_type.lower().replace("-", "_"), list(CONFIG_MAPPING.keys()), n=1)
    return UsageError(f"{config_file}: model_type {model_type!r} is no architecture that the installed "
                      f"transformers {transformers.__version__} implements"
                      + (f" (it has {near[0]!r}; if that was meant, correct the name)" if near else "")
                      + ". A model released after this transformers needs a newer one (pip install -U "
                      "transformers); a model whose architecture is only in its own code needs a checkpoint "
                      "converted to one that transformers implements.")


def check_model_config(config, path: str | Path):
    """``config``, once it is one language model with sizes that are positive integers (``path`` names it).

    Raises:
        UsageError: a config of several text models (MusicGen), or a size that is not a positive integer.
    """
    try:
        text = config.get_text_config()
    except ValueError:  # transformers finds several text sub-configs and cannot say which one is the LM
        parts = [n for n in ("text_encoder", "decoder", "generator", "text_config") if getattr(config, n, None)]
        raise UsageError(f"{path}: the {config.model_type!r} model combines several models with text configs "
                         f"({', '.join(parts)}), e.g. MusicGen's text encoder conditioning a "
                         "decoder of audio codes, so it is no single language model of text; qlora fine-tunes "
                         "decoder language models such as Llama, Qwen, Mistral, Gemma and Phi.") from None
    subs = getattr(config, "sub_configs", None) or {}
    nested = next(((k, v) for k, v in vars(config).items() if isinstance(v, dict) and "model_type" in v
                   and k not in subs), None)
    if nested is not None:  # the class would keep it a dict and fail deep inside the model's __init__
        raise UsageError(f"{path}: model_type {config.model_type!r} takes no {nested[0]}, yet the file nests one (a "
                         f"{nested[1]['model_type']!r} config): the top-level model_type is not that of the model "
                         f"the file describes (architectures: {', '.join(config.architectures or []) or 'none'}). "
                         "Set it back to the multimodal model's own type, as the released config.json has it.")
    per_layer = getattr(text, "per_layer_attributes", None) or ()  # reading these globally raises (dots3's heads)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        values = [getattr(layer, key, None) for layer in text.per_layer_config] if key in per_layer else [
            getattr(text, key, None)]
        values = [x for v in values for x in (v if isinstance(v, (list, tuple)) else [v])]  # Gemma 3n: per layer
        # transformers 5 types these fields itself; 4.x takes any value and fails deep inside a model's __init__
        value = next((v for v in values if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0)),
                     None)
        if value is not None:
            raise UsageError(f"{path}: {key} must be a positive integer, got {value!r}; the file is damaged or "
                             "edited by hand.")
    return config


def load_tokenizer(folder: str | Path):
    """The fast tokenizer saved in ``folder``.

    A folder with only a slow SentencePiece ``tokenizer.model`` (no ``tokenizer.json``) needs the
    ``sentencepiece`` package to be converted; without it transformers fails deep inside its converter,
    so that case is named here with what to do.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    slow_only = (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file()
    if slow_only and importlib.util.find_spec("sentencepiece") is None:
        raise UsageError(f"{folder} has only a SentencePiece tokenizer.model (no tokenizer.json); reading it "
                         "needs the sentencepiece package: pip install sentencepiece (and protobuf). Or save "
                         "the tokenizer once as tokenizer.json where sentencepiece is installed "
                         "(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)).")
    needs = ("A model folder needs tokenizer.json (or tokenizer.model with sentencepiece installed) and "
             "tokenizer_config.json; into a checkpoint saved without them, copy those of the model it was trained "
             "from.")
    if folder.is_dir() and not any(_holds_vocabulary(f.name) for f in folder.iterdir()):
        # transformers would build the config's tokenizer class without a vocabulary, or fail deep inside
        raise UsageError(f"{folder} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                         f"tokenizer.model, vocab.json...). {needs}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - narrowed below
        # 4.x: TypeError for a vocabulary file missing; the tokenizers library's own errors (a damaged
        # tokenizer.json under 4.x) are plain Exceptions
        if not (isinstance(exc, (OSError, ValueError, ImportError, TypeError)) or type(exc) is Exception):
            raise
        custom = tokenizer_code_error(folder) if isinstance(exc, ValueError) else None
        if custom is not None:
            raise custom from None
        raise UsageError(f"the tokenizer in {folder} could not be loaded ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}). {needs}") from None
    # transformers 5 builds a GPT-2 or Qwen tokenizer with no vocabulary where its files are missing
    if not tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise UsageError(f"the tokenizer in {folder} has no vocabulary (it encodes text to no tokens; transformers "
                         f"built an empty {type(tokenizer).__name__} from config.json). {needs}")
    return tokenizer


def _holds_vocabulary(name: str) -> bool:
    """Whether a file of this name is one transformers reads a tokenizer from."""
    return (name.startswith(("tokenizer", "vocab", "spiece", "sentencepiece")) or name == "merges.txt"
            or name.endswith((".tiktoken", ".model")))


def check_vocab_fits(tokenizer, rows: int, model_dir: str | Path) -> None:
    """Refuse a tokenizer whose ids index past the embedding (an IndexError deep in a forward otherwise).

    Fewer tokenizer ids than rows is normal: many checkpoints pad the embedding (32000 tokens, 32064
    rows) and the extra rows are simply never produced by the tokenizer.
    """
    n_ids = len(tokenizer)
    if n_ids > rows:
        raise UsageError(f"{model_dir}: the tokenizer has {n_ids} tokens (ids up to {n_ids - 1}) but the model's "
                         f"embedding has only {rows} rows; the tokenizer does not belong to this model. Use the "
                         "tokenizer the model was trained with (a fine-tune that added tokens saves its tokenizer "
                         "next to its adapter).")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _packed_layers(keys: dict[Path, list[str]], layout: CheckpointLayout, dense_keys: set[str],
                   model: nn.Module) -> set[str]:
    """Model paths of the layers a bitsandbytes 4-bit checkpoint stores packed (those with a quant state).
    Read in the model's naming: a renamed layer's file keys may lack ``.weight`` (Inkling 2 stores
    ``sconv.weight_proj.absmax`` for the model's ``sconv.weight_proj.weight.absmax``)."""
    paths = set()
    for raw in (k for file_keys in keys.values() for k in file_keys):
        stem, sep, rest = layout.target(raw).partition(".weight.")
        if sep and rest.startswith(("quant_state.", "absmax", "quant_map")):
            key = _model_key(stem + ".weight", dense_keys, model)
            paths.add(key[: -len(".weight")])
    return paths


def _experts_weight(model: nn.Module, key: str, experts_paths: set[str]) -> tuple[Experts4bit, str, str] | None:
    """The :class:`~qlora.nn.Experts4bit`, its path and weight name that model key ``key`` is, or None."""
    path, _, name = key.rpartition(".")
    while path and path not in experts_paths:
        path, _, leaf = path.rpartition(".")
        name = f"{leaf}.{name}"
    if not path:
        return None
    module = model.get_submodule(path)
    return (module, path, name) if name in module.weight_names else None


def _is_conv1d_weight(model: nn.Module, key: str) -> bool:
    path, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(path)
    except AttributeError:  # a key the model has no module for: placed (or refused) as it is
        return False
    return leaf == "weight" and (is_conv1d(module) or getattr(module, "from_conv1d", False))


def _model_key(raw: str, expected: set[str], model: nn.Module) -> str:
    """Map a checkpoint key to the model's naming (base-model prefix added or dropped)."""
    base = str(getattr(model, "base_model_prefix", "") or "")
    stem = raw.split(".weight.", 1)[0] + ".weight" if ".weight." in raw else raw
    if stem in expected or not base:
        return raw
    if base and f"{base}.{stem}" in expected:
        return f"{base}.{raw}"
    if base and stem.startswith(base + ".") and stem[len(base) + 1:] in expected:
        return raw[len(base) + 1:]
    return raw


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total_bytes: int, enabled: bool | None):
    if enabled is False or (enabled is None and total_bytes < 1 << 30):
        return _NoBar()
    from qlora.progress import progress_bar

    return progress_bar(total_bytes, unit="B", unit_scale=True, desc="loading (quantize-on-load)")
