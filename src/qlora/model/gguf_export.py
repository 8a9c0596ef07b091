"""Write a model, its adapters folded in, as one GGUF file for llama.cpp and Ollama.

The merged weights are those of ``qlora merge``: each adapter folded into the
dequantized 4-bit base it was trained against (:func:`qlora.model.merge.merged_tensors`).
They are streamed: the header and tensor table are written from shapes alone,
then each tensor is merged, converted and written in turn, so peak memory is
the 4-bit model plus one dense layer, never a second copy of the model.

Types follow llama.cpp's converter: 1-D tensors (norms), every bias (gpt-oss's
per-expert ones too), RoPE factor tables, MoE routers (``ffn_gate_inp``; Qwen2-MoE's shared-expert gate too) and
learned position tables (``position_embd``: GPT-2, StarCoder) stay float32; matrices are f16, bf16 or q8_0
(q8_0 falls back to f16 for a row length that is not a multiple of its 32-value block). ``q8_0`` is
quantized by ``gguf.quants``, llama.cpp's own Python reference of the format.
Formats gguf-py cannot quantize (the k-quants such as q4_k_m) are made from the
f16 file by llama.cpp's own quantizer (:mod:`qlora.model.gguf_quantize`).

Of a vision-language model (Gemma 3, Mistral 3, LLaVA) the file holds the
language model, as llama.cpp's converter writes it; the vision tower goes to
a separate projector file (``mmproj``, :mod:`qlora.model.gguf_mmproj`).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..nn import experts_layout
from .gguf_arch import ArchSpec, arch_spec, llama_cpp_shape, tensor_namer, to_llama_cpp, write_metadata
from .gguf_deepseek import split_kv_b
from .gguf_vocab import gguf_vocab
from .merge import merged_tensors, tied_embeddings
from .quantize import non_text_names, text_decoder_path

TYPES = ("f32", "f16", "bf16", "q8_0")
# matrices kept f32 whatever the type, as llama.cpp's converter and quantizer keep them: MoE routers (a rounded router
# can pick other experts) and learned position tables (GPT-2, StarCoder)
KEEP_F32 = ("ffn_gate_inp", "ffn_gate_inp_shexp", "position_embd")


GGUF_VERSION = (0, 18)  # the writer methods (add_sliding_window_pattern, ...) and architectures (gpt-oss, ...) used


def require_gguf():
    """The ``gguf`` package, or a one-line install hint (also for a gguf too old to have what the export writes)."""
    from importlib.metadata import version

    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF export needs the gguf package (llama.cpp's own writer): "
                         "pip install 'qlora[export]'") from None
    installed = version("gguf")
    if tuple(int(p) for p in installed.split(".")[:2] if p.isdigit()) < GGUF_VERSION:
        raise UsageError(f"GGUF export needs gguf>={'.'.join(map(str, GGUF_VERSION))}; gguf {installed} is installed: "
                         "pip install -U 'qlora[export]'")
    return gguf


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]


def export_gguf(model: nn.Module, tokenizer, path: str | Path, out_type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (4-bit, LoRA or dense; adapters folded in) with ``tokenizer`` as a GGUF file.

    Args:
        path: the ``.gguf`` file to write (its parent must exist).
        out_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices.
        name: ``general.name`` (default: the file's stem).

    Raises:
        UsageError: unsupported architecture, tokenizer or configuration.
    """
    gguf = require_gguf()
    if out_type not in TYPES:
        raise UsageError(f"unknown GGUF type {out_type!r}; choose from {', '.join(TYPES)}")
    config = model.config.get_text_config()  # a vision-language model's text part is what llama.cpp runs
    spec = arch_spec(config)
    path = Path(path)
    n_vocab = model.get_input_embeddings().weight.shape[0]  # added tokens may have grown it past the config
    vocab = gguf_vocab(tokenizer, n_vocab, getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                       model.config)

    with staged_writer(gguf, path, spec.gguf_arch) as writer:
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type(gguf, out_type))
        extra = write_metadata(writer, config, spec, n_vocab)
        _write_vocab(writer, vocab)
        plan, scalars = _plan(model, config, spec, out_type, extra)
        for kind, values in scalars.items():
            getattr(writer, f"add_{kind}")(values)
        for t in plan:
            byte_shape = tuple(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(encode_tensor(gguf, t.make(), t.qtype))
    return path


@contextmanager
def staged_writer(gguf, path: Path, arch: str) -> Iterator:
    """A ``GGUFWriter`` on ``path.partial``, renamed to ``path`` when the block ends: a failed export leaves no
    half-written file (the model, adapter and projector writers share it)."""
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        yield writer
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def matrix_type(gguf, out_type: str, row: int):
    """The ``GGMLQuantizationType`` of a matrix with rows of ``row`` values in an ``out_type`` file (f32, f16,
    bf16, q8_0): q8_0's blocks of 32 need whole rows of them, else f16, as llama.cpp's converter falls back."""
    Q = gguf.GGMLQuantizationType
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[out_type]
    return Q.F16 if qtype == Q.Q8_0 and row % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] else qtype


def file_type(gguf, out_type: str) -> int:
    """``general.file_type`` of a file whose matrices are ``out_type``."""
    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[out_type]


def _plan(model: nn.Module, config, spec: ArchSpec, out_type: str,
          extra: list[tuple[str, torch.Tensor]]) -> tuple[list[_Planned], dict[str, list[float]]]:
    """The tensors to write, and the per-layer scalars (``spec.layer_scalars``) llama.cpp reads as metadata."""
    import gguf

    name_of = tensor_namer(config, spec)
    towers = tuple(t + "." for t in non_text_names(model))
    rename = _causal_lm_key(model) if towers else (lambda key: key)
    rows = [(rename(key), shape, make)
            for key, shape, make in _expert_lists(model, _expert_tensors(model, merged_tensors(model), spec))
            if not key.startswith(towers)]
    if spec.mla:
        rows = split_kv_b(rows, config)
    if spec.split_rows:
        rows = _split_rows(rows, spec)
    tied = tied_embeddings(model)
    plan: list[_Planned] = []
    unknown = []
    scalars: dict[str, list[float]] = {}
    for key, shape, make in rows:
        scalar = next((g for end, g in spec.layer_scalars if key.endswith(end)), None)
        if scalar is not None:  # rows come in layer order
            scalars.setdefault(scalar, []).append(float(make().float().reshape(-1)[0]))
            continue
        gguf_name = name_of(key)
        if gguf_name == "output.weight" or (gguf_name is None and key == "lm_head.weight"):
            if tied and not spec.output_required:
                continue  # llama.cpp reuses token_embd
            if not spec.has_output:
                raise UsageError(f"this {config.model_type} model's output layer differs from its embedding, but "
                                 f"llama.cpp's {spec.gguf_arch} always uses the embedding as output layer; the "
                                 f"GGUF would compute different logits. Refusing to export.")
        if gguf_name is None:
            unknown.append(key)
            continue
        shape = llama_cpp_shape(key, tuple(shape), spec)
        if len(shape) == 1 or gguf_name.endswith(".bias") or gguf_name.split(".")[-2] in KEEP_F32:
            qtype = gguf.GGMLQuantizationType.F32
        else:
            qtype = matrix_type(gguf, out_type, shape[-1])
        plan.append(_Planned(gguf_name, tuple(shape), qtype,
                             lambda key=key, make=make: to_llama_cpp(key, make(), config, spec)))
    if unknown:
        raise UsageError(f"GGUF export found tensors that llama.cpp's {spec.gguf_arch} layout has no place for: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}. This checkpoint is a "
                         f"variant qlora does not export.")
    for gguf_name, t in extra:
        plan.append(_Planned(gguf_name, tuple(t.shape), gguf.GGMLQuantizationType.F32, lambda t=t: t))
    return plan, scalars


def _expert_tensors(model: nn.Module, rows: list, spec: ArchSpec) -> list:
    """transformers' 3-D expert tensors as the stacks llama.cpp reads, ``[experts, out, in]`` each.

    The fused ``gate_up_proj`` becomes separate ``gate_proj`` and ``up_proj`` stacks: gate half first, as
    transformers' forward chunks it, or alternating rows (``spec.gate_up_interleaved``: gpt-oss). A transposed
    layout (``[experts, in, out]``: gpt-oss) is transposed back, ``down_proj`` included. Expert biases
    (``gate_up_proj_bias``, ``down_proj_bias``) are split the same way and named ``<proj>.bias``. The fused
    merged tensor is computed once for both halves: one layer's experts, then dropped.
    2-D stacks (DBRX's ``(experts * ff, hidden)``) are viewed ``[experts, ff, hidden]``, a weight applied as
    ``x @ W_e`` (DBRX's ``w2``) transposed to ``[experts, hidden, ff]``."""
    stacked = _stacked_experts(model)
    out = []
    for key, shape, make in rows:
        if key in stacked:
            rows_per_expert, transposed = stacked[key]
            experts, cols = shape[0] // rows_per_expert, shape[1]
            view = (experts, cols, rows_per_expert) if transposed else (experts, rows_per_expert, cols)
            out.append((key, view, lambda make=make, e=experts, t=transposed: _expert_stack(make(), e, t)))
            continue
        prefix, _, leaf = key.rpartition(".")
        fused = leaf in ("gate_up_proj", "gate_up_proj_bias")
        if leaf not in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") or (
                len(shape) != (2 if leaf.endswith("_bias") else 3)):
            out.append((key, shape, make))
            continue
        experts = model.get_submodule(prefix)
        layout = experts_layout(getattr(experts, "base_layer", experts))
        transposed = bool(layout and layout.is_transposed) and not leaf.endswith("_bias")
        shape = (shape[0], shape[2], shape[1]) if transposed else tuple(shape)
        proj = leaf.removesuffix("_bias")
        suffix = ".bias" if leaf.endswith("_bias") else ""
        if not fused:
            out.append((f"{prefix}.{proj}{suffix}", shape,
                        (lambda make=make: make().transpose(1, 2).contiguous()) if transposed else make))
            continue
        cache: dict[str, torch.Tensor] = {}

        def half(i: int, make=make, cache=cache, transposed=transposed, ff=shape[1] // 2) -> torch.Tensor:
            whole = cache.pop("fused", None) if i else None  # the up half is asked for right after the gate half
            if whole is None:
                whole = make()
                if i == 0:
                    cache["fused"] = whole
            whole = whole.transpose(1, 2) if transposed else whole
            pick = slice(i, None, 2) if spec.gate_up_interleaved else slice(i * ff, (i + 1) * ff)
            return whole[:, pick].contiguous()

        for i, name in enumerate(("gate_proj", "up_proj")):
            out.append((f"{prefix}.{name}{suffix}", (shape[0], shape[1] // 2, *shape[2:]),
                        lambda half=half, i=i: half(i)))
    return out


# a weight of one expert in a list of them (transformers 4.x): list, expert index, projection, kind
PER_EXPERT_KEY = re.compile(r"(.+\.experts)\.(\d+)\.(.+)\.(weight|bias)")


def _expert_lists(model: nn.Module, rows: list) -> list:
    """transformers 4.x's experts, a ``ModuleList`` of per-expert MLPs (``experts.0.gate_proj.weight``, ...), as
    the stacks transformers 5 holds the same weights in and llama.cpp reads: ``experts.gate_proj`` ``[experts, out,
    in]`` (biases ``experts.gate_proj.bias``), in the place of the first expert's row. A stack is made when it is
    written, from its experts in order: one layer's experts at a time, as a 3-D stack is."""
    out: list = []
    stacks: dict[str, list[tuple[int, Callable[[], torch.Tensor]]]] = {}
    for key, shape, make in rows:
        found = PER_EXPERT_KEY.fullmatch(key)
        if found is None or not isinstance(model.get_submodule(found[1]), nn.ModuleList):
            out.append((key, shape, make))
            continue
        prefix, index, proj, kind = found.groups()
        stacked = f"{prefix}.{proj}" + (".bias" if kind == "bias" else "")
        if stacked not in stacks:
            stacks[stacked] = []
            out.append((stacked, shape, None))
        stacks[stacked].append((int(index), make))
    return [(key, shape, make) if make is not None else
            (key, (len(stacks[key]), *shape), _stacker([m for _, m in sorted(stacks[key], key=lambda p: p[0])]))
            for key, shape, make in out]


def _stacker(makes: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    return lambda: torch.stack([make() for make in makes])


def _split_rows(rows: list, spec: ArchSpec) -> list:
    """Fused matrices (``spec.split_rows``) as their equal row chunks, each under its own key (of an expert stack
    ``[experts, rows, in]``, each expert's rows)."""
    out = []
    for key, shape, make in rows:
        end, parts = next(((e, p) for e, p in spec.split_rows if key.endswith(e)), ("", ()))
        if not parts:
            out.append((key, shape, make))
            continue
        stem, n = key.removesuffix(end), len(parts)
        for i, part in enumerate(parts):
            out.append((stem + part, (*shape[:-2], shape[-2] // n, shape[-1]),
                        lambda make=make, i=i, n=n: make().chunk(n, dim=-2)[i].contiguous()))
    return out


def _stacked_experts(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """State-dict key -> (rows per expert, applied as ``x @ W_e``) of each expert weight stored as a 2-D stack."""
    found = {}
    for name, module in model.named_modules():
        layout = experts_layout(getattr(module, "base_layer", module))
        if layout is not None and layout.rows:
            for weight in layout.names:
                found[f"{name}.{weight}"] = (layout.rows, layout.applied_transposed(weight))
    return found


def _expert_stack(tensor: torch.Tensor, experts: int, transposed: bool) -> torch.Tensor:
    stack = tensor.reshape(experts, -1, tensor.shape[-1])
    return stack.transpose(1, 2).contiguous() if transposed else stack


def _causal_lm_key(model: nn.Module) -> Callable[[str], str]:
    """A vision-language model's keys as its language model alone names them: ``model.layers.0...``
    for ``model.language_model.layers.0...`` (Gemma 3), or ``language_model.model.layers.0...`` (Llama 4)."""
    path = text_decoder_path(model)
    inner = "" if model.get_submodule(path).get_output_embeddings() is not None else "model."
    return lambda key: inner + key[len(path) + 1:] if key.startswith(path + ".") else key


def encode_tensor(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes in ``qtype`` as a uint8 array."""
    Q = gguf.GGMLQuantizationType
    t = tensor.detach().to("cpu")
    if qtype == Q.F32:
        data = t.float().numpy()
    elif qtype == Q.F16:
        data = t.to(torch.float16).numpy()
    elif qtype == Q.BF16:
        data = t.to(torch.bfloat16).view(torch.int16).numpy()
    else:
        data = gguf.quants.quantize(t.float().numpy(), qtype)
    return np.ascontiguousarray(data).view(np.uint8)


def _write_vocab(writer, vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        add = getattr(writer, f"add_{kind}_token_id", None)
        if add is not None:
            add(tid)
    if vocab.eos_ids:
        writer.add_array("tokenizer.ggml.eos_token_ids", vocab.eos_ids)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
