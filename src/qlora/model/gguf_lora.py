"""Write a LoRA adapter alone as a GGUF LoRA adapter, the file llama.cpp's ``convert_lora_to_gguf.py`` writes.

One base GGUF then takes any number of adapters: llama.cpp's ``--lora``, llama-cpp-python's ``lora_path``,
Ollama's Modelfile ``ADAPTER``. The format (llama.cpp's ``llama-adapter.cpp`` reads it):

- metadata ``general.type`` ``adapter``, ``adapter.type`` ``lora``, ``adapter.lora.alpha`` and the base's
  ``general.architecture`` (llama.cpp refuses an adapter of another architecture);
- for each adapted base tensor ``<name>.weight`` two matrices ``<name>.weight.lora_a`` (PEFT's ``A``,
  ``[r, in]``) and ``<name>.weight.lora_b`` (PEFT's ``B``, ``[out, r]``); llama.cpp adds
  ``alpha / r * B A`` with ``r`` read per tensor from ``lora_a``.

The base tensor gets row transforms in its GGUF (Q/K rows reordered for llama.cpp's RoPE, fused QKV regrouped,
fused rows split): rows of ``B A`` are rows of ``B``, so ``B`` gets the same transform and ``A`` is kept. One
alpha is all the file holds, so a tensor whose own scaling differs (``alpha_pattern``, rsLoRA's
``alpha / sqrt(r)`` with ``rank_pattern``) has its ``B`` rescaled: the product llama.cpp computes is PEFT's.

Nothing the base does not already hold can be added: DoRA's magnitudes, LoRA biases, trained biases, tensors
trained whole (``modules_to_save``, new token rows), LoRA on embeddings and on MoE expert stacks are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import UsageError
from .adapter_io import drop_velora_projections, read_adapter_config, read_adapter_weights
from .adapter_tensors import PEFT_PREFIX, lora_key
from .gguf_arch import arch_spec, tensor_namer, to_llama_cpp
from .gguf_export import PER_EXPERT_KEY, encode_tensor, file_type, matrix_type, require_gguf, staged_writer

TYPES = ("f32", "f16", "bf16", "q8_0")
MERGED = "export the merged model instead: qlora export --format gguf (merged)"


def export_gguf_lora(config, adapter_dir: str | Path, path: str | Path, out_type: str = "f16",
                     name: str | None = None) -> Path:
    """Write the adapter in ``adapter_dir`` (PEFT format) for the base model of ``config`` as a GGUF LoRA adapter.

    Args:
        config: the base model's transformers config.
        path: the ``.gguf`` file to write (its parent must exist); written whole or not at all.
        out_type: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the LoRA matrices (q8_0 falls back to f16 for a
            row length that is not a multiple of 32, as the merged export does).

    Raises:
        UsageError: an adapter or architecture llama.cpp's LoRA adapters cannot express.
    """
    gguf = require_gguf()
    if out_type not in TYPES:
        raise UsageError(f"unknown GGUF adapter type {out_type!r}; choose from {', '.join(TYPES)}")
    adapter_dir, path = Path(adapter_dir), Path(path)
    if config.get_text_config() is not config:
        raise UsageError(f"GGUF LoRA export writes adapters of language models; {config.model_type} is a "
                         f"multimodal checkpoint, whose keys llama.cpp's adapter loader does not map. {MERGED}.")
    spec = arch_spec(config)
    adapter = read_adapter_config(adapter_dir)
    _refuse_variants(adapter, adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    drop_velora_projections(adapter, tensors)  # (backward state: VeLoRA's forward is plain LoRA's)
    alpha, tensors = adapter_matrices(config, adapter, tensors, adapter_dir)
    with staged_writer(gguf, path, spec.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type(gguf, out_type))
        for tensor_name, t in tensors:
            qtype = matrix_type(gguf, out_type, t.shape[-1])
            writer.add_tensor(tensor_name, encode_tensor(gguf, t, qtype),
                              raw_shape=gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return path


def adapter_matrices(config, adapter: dict, tensors: dict[str, torch.Tensor],
                     source: Path) -> tuple[float, list[tuple[str, torch.Tensor]]]:
    """``(alpha, [(gguf name, matrix)])``: the adapter's ``A``/``B`` pairs in llama.cpp's names and layout, ``B``
    rescaled where a tensor's own scaling is not ``alpha / r`` (see the module docstring)."""
    spec = arch_spec(config)
    name_of = tensor_namer(config, spec)
    # PEFT saves an adapted embedding's or head's table beside its pair (``.base_layer.``): the base's own, unless
    # training grew the vocabulary, which the base GGUF cannot follow
    tables = {k: v for k, v in tensors.items() if ".base_layer." in k and ".lora_" not in k}
    grown = [k for k, v in tables.items() if v.shape[0] != config.vocab_size]
    if grown:
        raise UsageError(f"{source} resized {grown[0]} to {tables[grown[0]].shape[0]} rows (added tokens); the base "
                         f"GGUF has {config.vocab_size}, and an adapter cannot add rows. {MERGED}.")
    whole = sorted(k for k in tensors if k not in tables and (".lora_" not in k or not k.startswith(PEFT_PREFIX)))
    skip = set(whole) | set(tables)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in skip:
            continue
        module, kind = lora_key(key)
        if kind not in ("A.weight", "B.weight"):
            what = {"B.bias": "a LoRA bias (lora_bias)", "embedding_A": "LoRA on an embedding",
                    "embedding_B": "LoRA on an embedding"}.get(kind, f"a {kind} tensor")
            raise UsageError(f"{source}: {key} is {what}, which llama.cpp's LoRA adapters cannot hold. {MERGED}.")
        pairs.setdefault(module, {})[kind[0]] = value.float()
    r, rslora = int(adapter["r"]), bool(adapter.get("use_rslora"))
    alpha = float(adapter["lora_alpha"]) * (math.sqrt(r) if rslora else 1.0) or float(r)  # 0 means "unscaled" there
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out: list[tuple[str, torch.Tensor]] = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise UsageError(f"{source}: {module} has lora_{next(iter(pair))} without its pair; the adapter file "
                             f"is incomplete. Save the adapter again.")
        key = module + ".weight"
        parts = _parts(key, spec)
        names = [name_of(k) for k in parts]
        gguf_name = None if None in names else names[0]
        if (gguf_name == "output.weight" or key == "lm_head.weight") and (
                tied and not spec.output_required or not spec.has_output):
            raise UsageError(f"{source} adapts {module}, the output layer, but llama.cpp's {spec.gguf_arch} GGUF of "
                             f"this base has no output tensor to add it to: it reuses the embedding (this base shares "
                             f"the two, or llama.cpp always does). {MERGED}.")
        if gguf_name is None and PER_EXPERT_KEY.fullmatch(key):  # transformers 4.x's per-expert linear layers
            raise UsageError(f"{source} adapts the expert weights {module} (LoRA on one expert's layer, which the "
                             f"GGUF holds in a stack of every expert's), which qlora does not write as a GGUF "
                             f"adapter. {MERGED}.")
        if gguf_name is None:
            raise UsageError(f"{source} adapts {module}, which llama.cpp's {spec.gguf_arch} layout has no tensor for "
                             f"(or the adapter was made for another base model). {MERGED}.")
        if "_exps." in gguf_name or pair["A"].dim() != 2:
            raise UsageError(f"{source} adapts the expert weights {module} (LoRA on a mixture of experts' stacks), "
                             f"which qlora does not write as a GGUF adapter. {MERGED}.")
        if spec.mla and key.endswith("kv_b_proj.weight"):
            raise UsageError(f"{source} adapts {module}, which llama.cpp's {spec.gguf_arch} splits into per-head "
                             f"key and value matrices that a LoRA pair cannot be split into. {MERGED}.")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        own_alpha = _pattern_value(adapter.get("alpha_pattern"), module, float(adapter["lora_alpha"]))
        scaling = own_alpha / (math.sqrt(rank) if rslora else rank)
        factor = scaling * rank / alpha
        if abs(factor - 1.0) > 1e-12:
            b = b * factor
        # rows of B A are rows of B: the base's row transforms (after its [in, out] transpose, if any) apply to B
        b = to_llama_cpp(key, b.t() if spec.transpose and key.endswith(spec.transpose) else b, config, spec)
        for part, rows in zip(names, b.chunk(len(parts), dim=0)):
            out += [(f"{part}.lora_a", a.contiguous()), (f"{part}.lora_b", rows.contiguous())]
    if whole:  # (after the pairs: an embedding's LoRA brings a copy of its table, named by the pair's message)
        raise UsageError(f"{source} holds tensors trained whole ({', '.join(whole[:3])}"
                         f"{' ...' if len(whole) > 3 else ''}: modules_to_save, trained biases or new token rows); "
                         f"a GGUF LoRA adapter holds only LoRA pairs added to the base's matrices. {MERGED}.")
    if not out:
        raise UsageError(f"{source} holds no LoRA pairs to write.")
    return alpha, out


def _parts(key: str, spec) -> list[str]:
    """The keys of a fused matrix the base GGUF holds as equal row chunks (``spec.split_rows``; ``B``'s rows are
    chunked the same way), or ``[key]``."""
    end, parts = next(((e, p) for e, p in spec.split_rows if key.endswith(e)), ("", ()))
    return [key.removesuffix(end) + part for part in parts] if parts else [key]


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    from .inject import pattern_key

    key = pattern_key(patterns or {}, module)
    return float(patterns[key]) if key is not None else default


def _refuse_variants(adapter: dict, source: Path) -> None:
    """What a plain ``alpha / r * B A`` added to the base's matrices cannot compute."""
    init = adapter.get("init_lora_weights")
    bias = adapter.get("bias") or "none"
    saved = ", ".join(adapter.get("modules_to_save") or [])
    what = next((text for found, text in (
        (adapter.get("peft_type") == "ADALORA", "an AdaLoRA adapter (its SVD triplets and pruning masks)"),
        (adapter.get("use_dora"), "a DoRA adapter (use_dora: its magnitudes rescale the whole matrix)"),
        (adapter.get("lora_bias"), "an adapter with LoRA biases (lora_bias)"),
        (bias != "none", f"an adapter training biases (bias={bias!r})"),
        (adapter.get("target_parameters"), "an adapter on parameters of MoE experts or routers (target_parameters)"),
        (adapter.get("trainable_token_indices"), "an adapter with trained token rows (trainable_token_indices)"),
        (saved, f"an adapter trained whole on {saved} (modules_to_save)"),
        (isinstance(init, str) and (init == "loftq" or init.startswith(("pissa", "corda", "olora", "lora_ga"))),
         f"a {init} adapter, valid only on the base its init changed (init_lora_weights={init!r})"),
    ) if found), None)
    if what:
        raise UsageError(f"{source} is {what}, which llama.cpp's GGUF LoRA adapters (alpha / r * B A added to the "
                         f"base's matrices) cannot express. {MERGED}.")

