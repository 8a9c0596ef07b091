"""Memory calculator: how many bytes full fine-tuning, 16-bit LoRA and QLoRA need.

Counts are exact, not rules of thumb: the model is built on the ``meta``
device from its transformers config (no memory, no download), and its modules
are walked, so every architecture transformers knows is counted the same way.
Decoder ``nn.Linear`` and GPT-2 ``Conv1D`` weights and the 3-D expert weights
of MoE layers (one 4-bit matrix per expert; 16-bit with ``quantize_experts``
off, as bitsandbytes keeps them) are the quantized part; everything
else (embeddings, norms, biases, MoE routers, ``lm_head``) stays 16-bit, and a
tied embedding is counted once. The 4-bit bytes are what
:func:`qlora.quant.quantize_4bit` produces for each weight, tensor for tensor.

Activations are what the model's own layers save for backward, measured by a
forward pass on ``meta`` (:mod:`qlora.model.saved_activations`, read by
:func:`measured_activation_bytes`); where the layers cannot run there, a model
of a Llama block (:func:`activation_bytes`) stands in, and a note says so.
Logits are a model of what the loss keeps (:func:`logits_bytes`); the
optimizer and gradient rows follow from the trainable tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import UsageError
from ..nn import computed_experts, expert_matrix, expert_weight, experts_layout, is_router
from ..nn.chunked_ce import CHUNK_ROWS
from ..optimizer_names import optimizer_name  # the names qlora train --optim takes, aliases included
from ..quant import BLOCKSIZES
from ..quant.double_quant import NESTED_BLOCKSIZE
from .adapter_size import AdapterSize
from .architecture import check_runs_on_text, text_model_from_config
from .known_shapes import known_shape
from .local_path import near_local_path
from .quantize import (bnb_kept_names, fp32_linear_names, is_linear_like, is_plain_linear, is_skipped, kept_dense_names,
                       kept_in_fp32, matches_any)
from .saved_activations import LayerSaves, NotMeasurable, measure
from .shipped_code import model_code_error
from .target_hints import unmatched_hint, weight_modules

GIB = 1024**3
QUANT_TYPES = ("nf4", "fp4", "none")
METHODS = ("sft", "dpo", "orpo", "cpo", "simpo", "kto")
COLUMNS = ("full fine-tuning", "16-bit LoRA", "QLoRA")


@dataclass(frozen=True)
class TrainingOptions:
    """The training choices that change memory (names as the ``qlora train`` flags)."""

    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    quantize_experts: bool = True  # False: a 4-bit base keeps its 3-D expert weights 16-bit, whole
    rank: int = 16
    target_modules: tuple[str, ...] | str | None = None  # None: every quantized linear of the decoder; (): none;
    # a string: a regex matching whole module paths (PEFT's form, as a vision-language adapter saves it)
    target_parameters: tuple[str, ...] = ()  # 3-D expert weights with one LoRA per expert (PEFT's names)
    seq_len: int = 2048
    batch_size: int = 1
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_32bit"
    chunked_ce: bool = False  # qlora train's chunked loss (the CLI passes train's default, on)
    method: str = "sft"  # dpo, orpo, cpo, simpo: each example is a pair, two sequences through the model; kto: one
    precompute_ref: bool = False  # dpo, kto: reference log-probs computed before training
    adapter: AdapterSize | None = None  # an adapter folder continued: its saved tensors are what trains, exactly

    @property
    def sequences(self) -> int:
        """Sequences per micro-batch: a preference pair puts its chosen and rejected answers side by side."""
        return self.batch_size * (1 if self.method in ("sft", "kto") else 2)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_TYPES:
            raise UsageError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {self.quant!r}.")
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}.")
        try:
            object.__setattr__(self, "optim", optimizer_name(self.optim))  # transformers' names -> ours
        except ValueError as exc:
            raise UsageError(f"--optim: {exc}") from None
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        if self.precompute_ref and self.method not in ("dpo", "kto"):
            raise UsageError("--precompute-ref applies to --method dpo and kto.")
        for name in ("rank", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}.")


@dataclass(frozen=True)
class LinearShape:
    """One quantizable weight: module name and ``(out, in)`` of its matmul."""

    name: str
    out_features: int
    in_features: int
    adaptable: bool = True  # False for one expert of a 3-D experts weight: quantized, not a LoRA target
    own_layout: bool = False  # an expert of a layout of its own (DBRX, JetMoE, LongCat-Flash): no expert LoRA
    stored_4bit: bool = True  # False: a layer a bitsandbytes 4-bit checkpoint skipped, 16-bit yet a LoRA target

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class ModelCounts:
    """Exact parameter counts of a model, split into quantized and 16-bit parts."""

    linears: tuple[LinearShape, ...]  # decoder linear weights (the quantized part, and the LoRA targets)
    other_tensors: tuple[int, ...]  # numel of every other parameter, shared ones once
    num_layers: int
    fp32_params: int = 0  # of the other parameters, those the model class keeps in fp32 under bf16
    buffer_bytes: int = 0  # buffers at bf16 load: causal masks, rotary and decay tables
    # modules holding weights that are no LoRA target, path -> kind (:func:`qlora.model.target_hints.weight_modules`)
    other_modules: dict[str, str] = field(default_factory=dict)
    # linears kept 16-bit (output head, routers; counted in other_tensors): LoRA targets when named, as in training,
    # never by all-linear
    dense_linears: tuple[LinearShape, ...] = ()
    expert_params: int = 0  # of the 3-D expert weights as stored, every expert (kept 16-bit: all of them are held)
    # MoE routers that are no linear layer (transformers 5's *TopKRouter; counted in other_tensors): their 2-D weights
    # are --target-parameters targets (one adapter each), as add_lora's RouterLora
    routers: tuple[LinearShape, ...] = ()

    @property
    def quantized_params(self) -> int:
        return sum(lin.numel for lin in self.linears if lin.stored_4bit)

    @property
    def params_16bit(self) -> int:
        return sum(self.other_tensors) + sum(lin.numel for lin in self.linears if not lin.stored_4bit)

    @property
    def total_params(self) -> int:
        return self.quantized_params + self.params_16bit


# what a refusal of a name points at, rather than a wall of names
_KNOWN_NAMES = "a released model's hub id that qlora estimate knows offline (qlora estimate --list-models)"


def load_config(model: str, option: str = ""):
    """A transformers config from a local path, a released model known by its hub id or short name
    (:mod:`qlora.model.known_shapes`, no hub asked), or another hub id; ``option`` (``--model``) is the one that
    gave ``model``, named in the errors.

    Raises:
        UsageError: the name is none of these, or config.json is missing or bad.
    """
    from transformers import AutoConfig

    from .load import check_model_config, read_model_config

    path = Path(model).expanduser()
    shape = None if path.exists() else known_shape(model)  # a folder of that name is what the user holds
    if shape is not None:
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    if path.exists():
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise UsageError(f"{path} has no config.json; pass a model directory saved by transformers, "
                             f"a config.json file, or {_KNOWN_NAMES}.")
        try:
            if "model_type" not in json.loads(config_file.read_text()):
                raise KeyError("model_type")
        except (ValueError, KeyError, OSError, TypeError) as exc:
            raise UsageError(f"cannot read a transformers config from {config_file}: {exc}. "
                             "It must be JSON with a model_type that transformers knows.") from exc
        # from_pretrained, not for_model(**json): it decodes what save_pretrained encodes
        # (Falcon-H1's time_step_limit holds an infinity written as {"__float__": "Infinity"}).
        return read_model_config(config_file)
    if "/" in model and not model.startswith((".", "/")):
        from .. import hub

        cache_only = hub.cache_only()  # no minute of retries against a hub that is not there
        try:  # never transformers' question on the terminal, nor code from the repository (see shipped_code)
            config = AutoConfig.from_pretrained(model, local_files_only=cache_only, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            custom = _model_code_error(model) if isinstance(exc, ValueError) else None
            if custom is not None:
                raise UsageError(f"{option} {model}: {custom}".strip()) from None
            if cache_only:
                raise hub.unreachable_error(f"{option} {model}".strip(), "model config",
                                            f"a local path or {_KNOWN_NAMES}", cache_checked=True,
                                            near=near_local_path(model)) from None
            raise UsageError(f"{option} {model!r}".strip() + " is not a local path and its config could not be "
                             f"fetched from the hub ({exc.__class__.__name__}); pass a local path or "
                             f"{_KNOWN_NAMES}.{near_local_path(model)}") from exc
        return check_model_config(config, model)
    raise UsageError(f"{option} {model!r}".strip() + ": unknown model, not a local path nor a hub id (org/name); "
                     f"pass a model folder, a config.json, a hub id, or {_KNOWN_NAMES}.")


def _model_code_error(model: str) -> UsageError | None:
    """Why hub id ``model``'s config.json, now in the cache, names no model transformers builds: code it ships
    (:func:`~qlora.model.shipped_code.model_code_error`) or a ``model_type`` this transformers lacks."""
    from huggingface_hub import try_to_load_from_cache

    from .load import unknown_type_error

    cached = try_to_load_from_cache(model, "config.json")
    return (model_code_error(Path(cached)) or unknown_type_error(Path(cached))) if isinstance(cached, str) else None


def count_parameters(config) -> ModelCounts:
    """Walk the model built on the ``meta`` device (no memory is allocated).

    ``named_parameters`` yields a tied parameter once. The output embedding
    (``lm_head``) is a Linear but is kept in 16-bit, as transformers and
    bitsandbytes do, so it counts with the embeddings. A bitsandbytes 4-bit
    checkpoint's ``llm_int8_skip_modules`` (Unsloth's dynamic 4-bit releases list
    whole layers) stay 16-bit as loading keeps them: their linears are still
    adapted, their 3-D experts held whole.
    """
    from transformers.pytorch_utils import Conv1D

    from .load import bnb_4bit_config

    source = getattr(config, "name_or_path", "") or config.model_type
    with torch.device("meta"):
        model = text_model_from_config(config, source)
    check_runs_on_text(model, source)  # a model every command refuses has no training run to estimate
    # head, routers...: as load_model, whose default skip_modules ("lm_head") keeps all under it dense (RoBERTa's
    # lm_head.dense too)
    dense = kept_dense_names(model) | fp32_linear_names(model, torch.bfloat16) | bnb_kept_names(model) | {"lm_head"}
    quantized: dict[int, tuple[LinearShape, ...]] = {}
    notes = {name: "(kept in 16-bit, an output head or a router)" for name in dense}
    kept: dict[int, LinearShape] = {}
    stored: dict[int, int] = {}  # 3-D expert weight -> its numel
    unpacked = tuple((bnb_4bit_config(config) or {}).get("llm_int8_skip_modules") or ())
    for name, module in model.named_modules():
        if is_skipped(name, dense):
            if is_plain_linear(module):
                kept.setdefault(id(module.weight), LinearShape(name, module.out_features, module.in_features))
            continue
        if is_plain_linear(module):
            out_in = module.out_features, module.in_features
        elif isinstance(module, Conv1D):  # weight stored (in, out)
            out_in = module.weight.shape[1], module.weight.shape[0]
        else:
            out_in = None
        if unpacked and is_skipped(name, unpacked):
            if out_in:
                quantized[id(module.weight)] = (LinearShape(name, *out_in, stored_4bit=False),)
            continue
        if out_in:
            quantized[id(module.weight)] = (LinearShape(name, *out_in),)
        layout = experts_layout(module)
        # experts: each one 4-bit matrix (Experts4bit), slices the forward never reads not stored
        count = computed_experts(layout, module) if layout else 0
        for w in layout.names if layout else ():
            p = expert_weight(module, w)
            _, rows, cols = expert_matrix(layout, p)
            out_f, in_f = (cols, rows) if layout.applied_transposed(w) else (rows, cols)
            quantized[id(p)] = tuple(LinearShape(f"{name}.{w}.{e}", out_f, in_f, adaptable=False,
                                                 own_layout=not layout.standard) for e in range(count))
            stored[id(p)] = p.numel()
            notes[name] = "(3-D expert weights: adapt them with --target-parameters)"
    linears = tuple(lin for _, p in model.named_parameters() if id(p) in quantized for lin in quantized[id(p)])
    others = tuple(p.numel() for _, p in model.named_parameters() if id(p) not in quantized)
    fp32 = kept_in_fp32(model, torch.bfloat16)
    fp32_params = sum(p.numel() for n, p in model.named_parameters()
                      if id(p) not in quantized and fp32 is not None and fp32.search(n))
    # persistent float buffers are read from the checkpoint in bf16 (fp32 where the class keeps them so); the
    # others keep the dtype the model computes them in
    persistent = {id(b) for m in model.modules() for n, b in m.named_buffers(recurse=False)
                  if n not in m._non_persistent_buffers_set}
    buffers = {id(b): (n, b) for n, b in model.named_buffers()}.values()
    buffer_bytes = sum(b.numel() * (2 if b.is_floating_point() and id(b) in persistent and not (
        fp32 is not None and fp32.search(n)) else b.element_size()) for n, b in buffers)
    text = config.get_text_config()
    adaptable = [lin.name for lin in linears if lin.adaptable] + [lin.name for lin in kept.values()]
    in_experts = tuple(n + "." for n, m in model.named_modules() if experts_layout(m))
    routers = tuple(LinearShape(n, *m.weight.shape, adaptable=False) for n, m in model.named_modules()
                    if n and is_router(m) and not is_linear_like(m) and not n.startswith(in_experts))
    return ModelCounts(linears=linears, other_tensors=others, num_layers=text.num_hidden_layers,
                       fp32_params=fp32_params, buffer_bytes=buffer_bytes,
                       other_modules=weight_modules(model, adaptable, notes), dense_linears=tuple(kept.values()),
                       expert_params=sum(stored.values()), routers=routers)


def quantized_bytes(numel: int, blocksize: int, double_quant: bool) -> tuple[int, int]:
    """``(codes, constants)`` bytes of one tensor as ``quantize_4bit`` stores it.

    Codes: two per byte. Constants without double quantization: one fp32
    absmax per block + the 16-entry fp32 code table. With it: one uint8 per
    block, one fp32 nested absmax per 256 blocks, the fp32 offset, the 16-entry
    code table and the 256-entry fp32 nested code table.
    """
    blocks = -(-numel // blocksize)
    codes = -(-numel // 2)
    if not double_quant:
        return codes, blocks * 4 + 16 * 4
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return codes, blocks + nested_blocks * 4 + 4 + 16 * 4 + 256 * 4


def select_targets(counts: ModelCounts, target_modules: tuple[str, ...] | str | None) -> list[LinearShape]:
    """Linears that get LoRA adapters; names match the last part of a module name, a string
    (PEFT's regex form) the whole module path. All-linear (``None``) leaves the 16-bit head and routers out; a
    name or pattern adapts them, as training does.

    Raises:
        UsageError: a requested name matches no linear layer.
    """
    adaptable = [lin for lin in counts.linears if lin.adaptable]
    if target_modules is None:
        return adaptable
    adaptable += counts.dense_linears
    if isinstance(target_modules, str):
        chosen = [lin for lin in adaptable if re.fullmatch(target_modules, lin.name)]
        if not chosen:
            raise UsageError(f"the target modules pattern {target_modules!r} matches no linear layer of this model. "
                             + unmatched_hint(target_modules, [lin.name.rsplit(".", 1)[-1] for lin in adaptable],
                                              counts.other_modules))
        return chosen
    if not target_modules:
        return []
    leaves = {lin.name.rsplit(".", 1)[-1] for lin in adaptable}
    missing = [t for t in target_modules if t not in leaves]
    if missing:
        raise UsageError(f"--target-modules {', '.join(missing)} match no linear layer of this model. "
                         + unmatched_hint(missing, sorted(leaves), counts.other_modules))
    return [lin for lin in adaptable if lin.name.rsplit(".", 1)[-1] in target_modules]


def select_expert_targets(counts: ModelCounts, target_parameters: tuple[str, ...]) -> dict[str, list[LinearShape]]:
    """``{expert weight: its experts}`` adapted by ``target_parameters`` (PEFT's rule: the name equals
    ``<module>.<weight>`` or its end); each expert gets rank-r A and B, and a router's weight (one "expert") one.

    Raises:
        UsageError: a requested name matches no expert or router weight.
    """
    weights: dict[str, list[LinearShape]] = {}
    for lin in counts.linears:
        if not lin.adaptable:
            weights.setdefault(lin.name.rsplit(".", 1)[0], []).append(lin)
    names = sorted({w.rsplit(".", 1)[-1] for w in weights})
    weights |= {f"{lin.name}.weight": [lin] for lin in counts.routers}
    missing = [t for t in target_parameters if not any(matches_any(w, [t]) for w in weights)]
    if missing:
        raise UsageError(f"--target-parameters {', '.join(missing)} match no expert or router weight of this model; "
                         + (f"its expert weights are {', '.join(names)}." if names else "it has no 3-D experts.")
                         + (f" Its routers' weights are e.g. {counts.routers[0].name}.weight." if counts.routers
                            else ""))
    chosen = {w: lins for w, lins in weights.items() if target_parameters and matches_any(w, target_parameters)}
    own = [w for w, lins in chosen.items() if lins[0].own_layout]
    if own:
        raise UsageError(f"--target-parameters names {own[0]}, an expert weight in a layout of its own (DBRX's 2-D "
                         "stacks, JetMoE's parallel experts, LongCat-Flash's zero experts), which training refuses: "
                         "LoRA on expert weights covers transformers' standard 3-D experts only. Estimate with "
                         "--target-modules (attention, shared experts) instead.")
    return chosen


def _expert_targets(experts: dict[str, list[LinearShape]], counts: ModelCounts) -> str:
    """`` and 4 expert weights (one LoRA per expert) and 2 router weights``: what LoRA adapts beside the linears."""
    routers = sum(w in {f"{lin.name}.weight" for lin in counts.routers} for w in experts)
    words = [f"{len(experts) - routers} expert weights (one LoRA per expert)"] if len(experts) > routers else []
    words += [f"{routers} router weight{'' if routers == 1 else 's'}"] if routers else []
    return "".join(f" and {w}" for w in words)


def optimizer_bytes(tensor_numels: list[int], optim: str) -> int:
    """AdamW states (two per parameter) for the trainable tensors.

    32-bit: 8 bytes a parameter. 8-bit: 2 bytes a parameter plus one fp32
    absmax per 256 values per state; tensors under 4096 elements stay 32-bit
    (bitsandbytes' ``min_8bit_size``). Paging does not change the bytes.
    """
    if not optim.endswith("8bit"):
        return 8 * sum(tensor_numels)
    total = 0
    for n in tensor_numels:
        total += 8 * n if n < 4096 else 2 * (n + 4 * -(-n // 256))
    return total


def _widest(config, name: str):
    """``config.<name>``; for a config whose layers differ (Gemma 4's per-layer ``head_dim``, Gemma 3n's list of
    ``intermediate_size``), the largest layer's value: the estimate stays an upper bound."""
    if name in (getattr(config, "per_layer_attributes", None) or ()):
        values = [v for layer in config.per_layer_config if (v := getattr(layer, name, None)) is not None]
        return max(values) if values else None
    value = getattr(config, name, None)
    return max(value) if isinstance(value, (list, tuple)) and value else value


def _shape(config) -> dict[str, int]:
    """Widths of the Llama block model; an attention-free model (Mamba, RWKV, xLSTM: no attention heads)
    counts its mixer as one head of the hidden width, with queries, keys and values each that wide."""
    text = config.get_text_config()
    hidden = _widest(text, "hidden_size")
    heads = _widest(text, "num_attention_heads") or 1
    head_dim = _widest(text, "head_dim") or hidden // heads
    dense = max(_widest(text, "intermediate_size") or _widest(text, "n_inner") or 4 * hidden,
                _widest(text, "intermediate_size_mlp") or 0)  # Llama 4's dense layers
    routed, top_k = _moe_width(text)
    return dict(
        hidden=hidden,
        heads=heads,
        q=heads * head_dim,
        kv=(_widest(text, "num_key_value_heads") or heads) * head_dim,
        inter=max(dense, routed),
        top_k=top_k,
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
    )


def _first_count(text, names: tuple[str, ...]) -> int:
    return next((v for n in names if isinstance(v := _widest(text, n), int) and v > 0), 0)


# a configuration's own switch between its MoE and dense forms (Doge's is_moe, Gemma 4's enable_moe_block):
# off, the expert settings it keeps are not run
_MOE_SWITCHES = ("is_moe", "enable_moe_block")


def _moe_width(text) -> tuple[int, int]:
    """``(MLP width a token runs through, top-k)`` of a MoE layer: its top-k experts and shared experts side by
    side; ``(0, 0)`` for a dense model. Expert widths are ``moe_intermediate_size`` where the config has one
    (Qwen, DeepSeek), else ``intermediate_size`` (Mixtral, gpt-oss)."""
    if any(getattr(text, switch, None) is False for switch in _MOE_SWITCHES):
        return 0, 0
    experts = _first_count(text, ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"))
    top_k = _first_count(text, ("num_experts_per_tok", "moe_topk", "experts_per_token", "num_experts_per_token"))
    if not experts or not top_k:
        return 0, 0
    expert = _first_count(text, ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size"))
    shared = _first_count(text, ("shared_expert_intermediate_size", "shared_intermediate_size")) or (
        _first_count(text, ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")) * expert)
    return top_k * expert + shared, top_k


def activation_bytes(config, opts: TrainingOptions, lora_per_layer: float) -> int:
    """Bytes autograd keeps for the backward pass (a Llama block model): the fallback of
    :func:`measured_activation_bytes` for a model whose layers do not run on ``meta``.

    Per token and layer, in bf16 (2 bytes) unless noted, with SDPA attention
    and h = hidden, q/kv = query/key-value widths, i = intermediate, r = rank,
    n = LoRA-adapted linears in the layer::

        A = 2 x 8h            two RMSNorms: fp32 input copy 4h + normalized 2h + output 2h
          + 2(q + 2 kv)       rotated q, k and v, saved by SDPA
          + 2q + 4 heads      attention output and its fp32 logsumexp
          + 2 r n             LoRA A outputs, input of each B
          + 8i                gate, up, silu(gate), silu(gate) * up
          + 4kh               MoE: each of a token's top-k experts keeps its copy of the input and its output
        T = 2 x 2i            gradient transients of the MLP backward (d gate, d up)

    A MoE layer's i is its top-k experts' widths plus its shared experts' (:func:`_moe_width`), or the dense
    width where that is wider (the layers differ: the estimate takes the widest).

    Without checkpointing: ``tokens * (layers * A + T + 8h)`` (8h: final norm).
    With checkpointing only each layer's input survives the forward, and one
    layer is recomputed at a time: ``tokens * (layers * 2h + A + T + 8h)``.
    Dropout is taken as 0 (a mask and a dropped copy per adapter otherwise).
    """
    s = _shape(config)
    per_layer = (16 * s["hidden"] + 2 * (s["q"] + 2 * s["kv"]) + 2 * s["q"] + 4 * s["heads"]
                 + 2 * opts.rank * lora_per_layer + 8 * s["inter"] + 4 * s["top_k"] * s["hidden"])
    if opts.gradient_checkpointing:
        kept = s["layers"] * 2 * s["hidden"] + per_layer
    else:
        kept = s["layers"] * per_layer
    transient = 4 * s["inter"] + 8 * s["hidden"]
    return int(opts.batch_size * opts.seq_len * (kept + transient))


def measured_activation_bytes(config, opts: TrainingOptions, saves: LayerSaves, adapted: bool) -> int:
    """Bytes autograd keeps for the backward pass, from what each layer was measured to save
    (:func:`qlora.model.saved_activations.measure`; ``adapted``: the LoRA variant, else full fine-tuning).

    Without checkpointing every layer's saves survive the forward; with it only each layer's input does, and
    one layer at a time is recomputed, the layer that saves most counted. Saves outside the layers (final norm)
    come on top, and the backward's transient gradients of the widest MLP (``2 x 2i`` per token, as in
    :func:`activation_bytes`), which no forward measures.
    """
    per_layer = saves.adapted if adapted else saves.full
    outside = saves.outside_adapted if adapted else saves.outside_full
    if opts.gradient_checkpointing:
        kept = len(per_layer) * saves.layer_input + max(per_layer)
    else:
        kept = sum(per_layer)
    return int(opts.batch_size * opts.seq_len * (kept + outside + 4 * _shape(config)["inter"]))


def measure_activations(config, targets: list[LinearShape], rank: int) -> tuple[LayerSaves | None, str]:
    """``(what each layer saves, a note saying how the activations row was found)``; ``None`` where the layers
    cannot be run on ``meta``, and the formula is used."""
    source = getattr(config, "name_or_path", "") or config.model_type
    try:
        saves = measure(config, source, tuple(lin.name for lin in targets), rank)
    except NotMeasurable as exc:
        return None, (f"activations: from a formula of a Llama block, as the model's own layers could not be "
                      f"measured ({exc}); other attention shapes and extra norms may need more")
    return saves, ("activations: what the model's own layers save for backward, measured by a forward pass "
                   "on the meta device (fused SDPA/flash attention, no L x L scores)")


def logits_bytes(config, opts: TrainingOptions) -> int:
    """Peak bytes of the loss: 12 bytes per token and vocabulary entry.

    transformers upcasts the logits to fp32 for the cross-entropy; autograd
    keeps the fp32 log-softmax (4), and its backward holds the incoming fp32
    gradient (4) while writing the outgoing one (4). A chunked cross-entropy
    that never materializes the full logits brings this down to one chunk
    of rows (:data:`qlora.nn.chunked_ce.CHUNK_ROWS`) plus a float32
    log-sum-exp per token.
    """
    tokens = opts.batch_size * opts.seq_len
    if opts.chunked_ce:
        return 12 * min(tokens, CHUNK_ROWS) * _shape(config)["vocab"] + 4 * tokens
    return 12 * tokens * _shape(config)["vocab"]


@dataclass
class Estimate:
    """Rows of bytes per method, their totals, and notes for the reader."""

    rows: list[tuple[str, dict[str, int]]]
    notes: list[str] = field(default_factory=list)
    columns: tuple[str, ...] = COLUMNS

    def total(self, column: str) -> int:
        return sum(values.get(column, 0) for _, values in self.rows)

    def fits(self, column: str, gpu_memory_gib: float) -> bool:
        return self.total(column) <= gpu_memory_gib * GIB


def estimate(config, opts: TrainingOptions) -> Estimate:
    """The memory table for ``config`` trained with ``opts``.

    DPO, ORPO, CPO and SimPO run ``2 x batch`` sequences (chosen and rejected of each pair)
    through one forward pass, so activations and logits double. DPO's
    reference pass runs without gradient before the policy pass and keeps only
    two numbers a pair, so it adds no row for LoRA and QLoRA (the reference is
    the base with the adapter off); full fine-tuning must hold a frozen bf16
    copy of the model as its reference, unless the reference is precomputed.
    """
    counts = count_parameters(config)
    pairs = opts
    opts = replace(opts, batch_size=opts.sequences)
    experts = select_expert_targets(counts, opts.target_parameters)
    if opts.adapter is not None:  # its own ranks, DoRA magnitudes, modules trained whole, token rows, any layout
        with torch.device("meta"):
            model = text_model_from_config(config, getattr(config, "name_or_path", "") or config.model_type)
        adapter = opts.adapter.in_layout(model)
        experts = select_expert_targets(counts, tuple(adapter.config.get("target_parameters") or ()))
        adapted = set(adapter.lora_paths)
        targets = [lin for lin in (*counts.linears, *counts.dense_linears) if lin.adaptable and lin.name in adapted]
        lora_tensors = list(adapter.tensors)
    else:
        targets = select_targets(counts, opts.target_modules)
        lora_tensors = [n for lin in targets for n in (opts.rank * lin.in_features, lin.out_features * opts.rank)]
        lora_tensors += [n for lins in experts.values() for n in (opts.rank * len(lins) * lins[0].in_features,
                                                                   lins[0].out_features * opts.rank * len(lins))]
    lora_params = sum(lora_tensors)
    all_tensors = [lin.numel for lin in counts.linears] + list(counts.other_tensors)
    full, lora, q = COLUMNS
    columns = (full, lora) if opts.quant == "none" else COLUMNS
    # --no-quantize-experts: the 3-D expert weights stay bf16 whole (the experts the forward skips too)
    dense_experts = not opts.quantize_experts and counts.expert_params > 0
    packed = [lin for lin in counts.linears if (lin.adaptable or not dense_experts) and lin.stored_4bit]
    codes = consts = 0
    for lin in packed:
        c, k = quantized_bytes(lin.numel, opts.blocksize, opts.double_quant)
        codes, consts = codes + c, consts + k
    rows: list[tuple[str, dict[str, int]]] = [
        (f"linear weights (bf16 / 4-bit codes{', experts bf16' if dense_experts else ''})",
         {full: 2 * counts.quantized_params, lora: 2 * counts.quantized_params,
          q: codes + (2 * counts.expert_params if dense_experts else 0)}),
        ("quantization constants", {q: consts}),
        ("embeddings, norms, lm_head, biases (bf16)", {c: 2 * counts.params_16bit + 2 * counts.fp32_params
                                                       for c in COLUMNS}),
        ("buffers (masks, rotary and decay tables)", {c: counts.buffer_bytes for c in COLUMNS}),
        ("LoRA adapters (fp32)", {lora: 4 * lora_params, q: 4 * lora_params}),
        ("gradients", {full: 2 * counts.total_params, lora: 4 * lora_params, q: 4 * lora_params}),
        (f"optimizer states ({opts.optim})", {full: optimizer_bytes(all_tensors, opts.optim),
                                              lora: optimizer_bytes(lora_tensors, opts.optim),
                                              q: optimizer_bytes(lora_tensors, opts.optim)}),
    ]
    per_layer = len(targets) / counts.num_layers
    saves, how = measure_activations(config, targets, opts.rank)

    def activations(o: TrainingOptions, adapted: bool) -> int:
        if saves is None:
            return activation_bytes(config, o, per_layer if adapted else 0)
        return measured_activation_bytes(config, o, saves, adapted)

    gc = "on" if opts.gradient_checkpointing else "off"
    rows.append((f"activations (checkpointing {gc})", {full: activations(opts, False), lora: activations(opts, True),
                                                       q: activations(opts, True)}))
    loss_label = "logits + loss (fp32, chunked)" if opts.chunked_ce else "logits + loss (fp32)"
    rows.append((loss_label, {c: logits_bytes(config, opts) for c in COLUMNS}))
    if pairs.method in ("dpo", "kto"):
        rows.append((f"{pairs.method.upper()} reference model",
                     {full: 0 if pairs.precompute_ref else 2 * counts.total_params, lora: 0, q: 0}))
    rows = [(label, {c: v for c, v in values.items() if c in columns}) for label, values in rows]
    other_dq = sum(quantized_bytes(lin.numel, opts.blocksize, not opts.double_quant)[1] for lin in packed)
    in_experts = counts.quantized_params - sum(lin.numel for lin in packed)
    notes = [
        f"parameters: {counts.total_params:,} total, {counts.quantized_params - in_experts:,} in quantized linears, "
        f"{f'{in_experts:,} in 3-D experts kept bf16 (--no-quantize-experts), ' if in_experts else ''}"
        f"{counts.params_16bit:,} kept in 16-bit; LoRA r={opts.rank} on {len(targets)} linears"
        f"{_expert_targets(experts, counts)}: {lora_params:,}",
        f"quantization constants {'with' if opts.double_quant else 'without'} double quantization: "
        f"{consts / GIB:.3f} GiB ({'without' if opts.double_quant else 'with'}: {other_dq / GIB:.3f} GiB)",
        "full fine-tuning: bf16 weights and gradients, AdamW states as chosen (no fp32 master copy)",
    ]
    if counts.expert_params and opts.quant != "none":
        four = sum(sum(quantized_bytes(lin.numel, opts.blocksize, opts.double_quant))
                   for lin in counts.linears if not lin.adaptable)
        notes.append(f"QLoRA's 3-D MoE expert weights: {four / GIB:.2f} GiB 4-bit (--quantize-experts), "
                     f"{2 * counts.expert_params / GIB:.2f} GiB kept bf16 (--no-quantize-experts, axolotl's default)")
    if opts.optim.startswith("paged"):
        notes.append("paged optimizer states sit in unified memory: they can move to CPU RAM when the GPU fills")
    other_gc = replace(opts, gradient_checkpointing=not opts.gradient_checkpointing)
    notes.append(how)
    notes.append(f"QLoRA activations with checkpointing {'off' if opts.gradient_checkpointing else 'on'}: "
                 f"{activations(other_gc, True) / GIB:.2f} GiB")
    other_ce = logits_bytes(config, replace(opts, chunked_ce=not opts.chunked_ce))
    notes.append(f"loss {'without' if opts.chunked_ce else 'with'} the chunked cross-entropy (--"
                 f"{'no-' if opts.chunked_ce else ''}chunked-ce): {other_ce / GIB:.2f} GiB")
    if pairs.method == "kto":
        notes.append(f"KTO: {opts.batch_size} examples of {opts.seq_len} tokens per micro-batch with gradient; its KL "
                     "term's mismatched pairs and the reference run in no-grad passes before it")
    elif pairs.method != "sft":
        notes.append(f"{pairs.method.upper()}: {pairs.batch_size} pair(s) = {opts.batch_size} sequences of "
                     f"{opts.seq_len} tokens per micro-batch (chosen and rejected in one pass)")
    if pairs.method in ("dpo", "kto"):  # KTO's reference pass also scores the KL term's B mismatched pairs
        ref = 6 * opts.batch_size * (2 if pairs.method == "kto" else 1) * opts.seq_len * _shape(config)["vocab"]
        notes.append(f"{pairs.method.upper()} reference: the same base with the adapter off (LoRA, QLoRA: no second "
                     "model); "
                     + ("precomputed once before training" if pairs.precompute_ref else
                        f"its no-grad pass in each step peaks at {ref / GIB:.2f} GiB of logits, before the "
                        "policy pass and freed after it, so below the training peak"))
    return Estimate(rows=rows, notes=notes, columns=columns)


def format_table(est: Estimate, gpu_memory_gib: float | None = None) -> str:
    """The table as aligned text, GiB with two decimals, then verdict and notes."""
    label_w = max(len(label) for label, _ in est.rows + [("total", {})])
    col_w = [max(len(c), 8) for c in est.columns]

    def line(label: str, cells: list[str]) -> str:
        return "  ".join([label.ljust(label_w), *(cell.rjust(w) for cell, w in zip(cells, col_w))]).rstrip()

    out = [line("GiB", list(est.columns)), line("-" * label_w, ["-" * w for w in col_w])]
    for label, values in est.rows:
        out.append(line(label, [f"{values[c] / GIB:.2f}" if c in values else "-" for c in est.columns]))
    out.append(line("total", [f"{est.total(c) / GIB:.2f}" for c in est.columns]))
    if gpu_memory_gib is not None:
        out.append(line(f"fits in {gpu_memory_gib:g} GiB?",
                        ["yes" if est.fits(c, gpu_memory_gib) else "no" for c in est.columns]))
    out.append("")
    out.extend(f"- {note}" for note in est.notes)
    return "\n".join(out)
