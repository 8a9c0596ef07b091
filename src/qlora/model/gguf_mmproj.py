"""A vision-language model's image encoder as llama.cpp's projector file (``mmproj``).

llama.cpp runs a VLM from two files: the language model (:mod:`qlora.model.gguf_export`) and a ``clip``
GGUF holding the vision tower and the projector that maps its features into the language model's embedding
space, as ``convert_hf_to_gguf.py --mmproj`` writes it. Its ``clip.projector_type`` picks the graph llama.cpp
(``libmtmd``) builds; the tensor names, metadata keys and conventions here are those that graph reads.

Written: Gemma 3 (``gemma3``: a SigLIP tower, its patches average-pooled, Gemma's RMS norm, a projection),
Qwen2-VL (``qwen2vl_merger``: a ViT whose temporal Conv3d llama.cpp reads as two Conv2d weights, 2x2 patches merged
by an MLP) and Qwen2.5-VL (``qwen2.5vl_merger``: the same with RMS norms, a gated SiLU MLP and window attention in
all but every n-th block), checked against llama.cpp's own encoder. Other VLMs are refused by name
(:func:`mmproj_refusal`) rather than written in a layout llama.cpp might misread. :func:`plan_mmproj` makes every
check before anything is written (:func:`write_mmproj`), so a refused projector leaves no language-model file behind
either.

The tensors are the merged model's (:func:`qlora.model.merge.merged_tensors`): a projector an adapter trained
whole (``modules_to_save``) is the one written, as adapters are folded into the language model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from .adapter_base import read_json_object
from .merge import merged_tensors
from .quantize import non_text_names

TYPES = ("f32", "f16")


@dataclass(frozen=True)
class _Projector:
    clip_type: str  # llama.cpp's clip.projector_type
    tower: tuple[str, ...]  # the vision tower's attribute name, first found wins
    projector: tuple[str, ...]  # the projector's (it may sit inside the tower: Qwen2-VL's merger)
    tensors: dict[str, str]  # projector key (relative) -> GGUF name
    tower_names: Callable[[str], list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] | None]


_PROJECTORS = {
    "gemma3": _Projector("gemma3", ("vision_tower",), ("multi_modal_projector",),
                         {"mm_input_projection_weight": "mm.input_projection.weight",
                          "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}, lambda key: _siglip_names(key)),
    "qwen2_vl": _Projector("qwen2vl_merger", ("visual",), ("merger",),
                           {"ln_q.weight": "v.post_ln.weight", "ln_q.bias": "v.post_ln.bias",
                            "mlp.0.weight": "mm.0.weight", "mlp.0.bias": "mm.0.bias",
                            "mlp.2.weight": "mm.2.weight", "mlp.2.bias": "mm.2.bias"}, lambda key: _qwen_vl_names(key)),
    "qwen2_5_vl": _Projector("qwen2.5vl_merger", ("visual",), ("merger",),
                             {"ln_q.weight": "v.post_ln.weight",  # an RMS norm: no bias
                              "mlp.0.weight": "mm.0.weight", "mlp.0.bias": "mm.0.bias",
                              "mlp.2.weight": "mm.2.weight", "mlp.2.bias": "mm.2.bias"},
                             lambda key: _qwen_vl_names(key)),
}

# VLM families whose language model qlora exports but whose projector it does not write, and why.
_REFUSED = {
    "idefics3": "Idefics3's projector (idefics3 in llama.cpp) splits images into tiles plus a global view its own "
                "way; qlora has not checked its file against llama.cpp's encoder",
    "smolvlm": "SmolVLM's projector (idefics3 in llama.cpp) splits images into tiles plus a global view its own "
               "way; qlora has not checked its file against llama.cpp's encoder",
    "llava": "llama.cpp's converter has no mmproj path for transformers-format LLaVA (its LLaVA-1.5 projectors come "
             "from the original checkpoints' surgery scripts), so there is no layout to check one against",
    "llava_next": "llama.cpp's converter has no mmproj path for transformers-format LLaVA-NeXT",
    "llava_onevision": "llama.cpp's converter has no mmproj path for transformers-format LLaVA-OneVision",
}
_GENERIC = ("qlora writes llama.cpp projector files for Gemma 3, Qwen2-VL and Qwen2.5-VL only; this family's is "
            "not checked against llama.cpp's")


def is_vision_language(model: nn.Module) -> bool:
    """Whether ``model`` is a vision-language model with its vision tower loaded."""
    return getattr(model.config, "vision_config", None) is not None and bool(non_text_names(model))


def mmproj_refusal(model: nn.Module) -> str | None:
    """Why no projector file is written for this model, or None (one is written, or it is text-only)."""
    if not is_vision_language(model) or model.config.model_type in _PROJECTORS:
        return None
    return _REFUSED.get(model.config.model_type, _GENERIC)


def mmproj_type(out_type: str) -> str:
    """The projector's matrix type for the language model's ``--type``: f32 stays f32, anything else is f16
    (llama.cpp's projectors are float; a quantized language model pairs with an f16 projector)."""
    return "f32" if out_type == "f32" else "f16"


@dataclass(frozen=True)
class MmprojPlan:
    """A projector file checked and laid out but not written: every refusal happens while planning, so the
    command stops before it writes the language model's file beside it."""

    out_type: str  # f32 or f16: the matrices' type
    metadata: list[tuple[str, object]]  # (GGUFWriter add_* method, value), in writing order
    tensors: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], bool]]  # (name, shape, make, f32)


def plan_mmproj(model: nn.Module, model_dir: str | Path, out_type: str = "f16") -> MmprojPlan:
    """Check ``model``'s vision tower and projector (adapters folded in) against llama.cpp's ``mmproj`` layout.

    ``out_type`` (``f32`` or ``f16``) is the matrices' type; embeddings, norms and biases are f32.
    ``model_dir`` holds the image processor's mean and std, which llama.cpp normalizes pixels with.

    Raises:
        UsageError: a family without a projector layout here, or settings llama.cpp cannot represent.
    """
    config = model.config
    refusal = mmproj_refusal(model)
    if refusal is not None or not is_vision_language(model):
        raise UsageError(f"no llama.cpp projector for a {config.model_type} model: {refusal or 'no vision tower'}")
    spec = _PROJECTORS[config.model_type]
    if out_type not in TYPES:
        raise UsageError(f"unknown projector type {out_type!r}; choose from {', '.join(TYPES)}")
    processor = _image_processor_settings(Path(model_dir))
    metadata = _metadata(spec, config, config.vision_config, config.get_text_config(), processor)

    tower, projector = _module_path(model, spec.tower), _module_path(model, spec.projector)
    tensors: list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], bool]] = []
    unknown = []
    for key, shape, make in merged_tensors(model):
        if key.startswith(projector + "."):
            gguf_name = spec.tensors.get(key[len(projector) + 1:])
            parts = [(gguf_name, _same)] if gguf_name else None
        elif key.startswith(tower + "."):
            parts = spec.tower_names(key[len(tower) + 1:])
        else:
            continue
        if parts is None:
            unknown.append(key)
            continue
        for gguf_name, part in parts:  # none: SigLIP's pooling head, unused by these models
            if gguf_name == "mm.soft_emb_norm.weight":  # Gemma's RMS norm scales by 1 + w; llama.cpp's by w
                part = _plus_one
            # embeddings stay f32 as llama.cpp's converter keeps them (its encoder rounds the patch weights itself)
            f32 = (out_type == "f32" or len(shape) == 1 or gguf_name.startswith(("v.patch_embd", "v.position_embd"))
                   or gguf_name.endswith("_norm.weight"))
            tensors.append((gguf_name, tuple(part(torch.empty(tuple(shape), device="meta")).shape),
                            lambda make=make, part=part: part(make()), f32))
    if unknown:
        raise UsageError(f"the vision encoder has tensors llama.cpp's {spec.clip_type} projector has no place for: "
                         f"{', '.join(unknown[:5])}. This checkpoint is a variant qlora does not export.")
    return MmprojPlan(out_type, metadata, tensors)


def write_mmproj(plan: MmprojPlan, path: str | Path, name: str | None = None) -> Path:
    """Write a planned projector file at ``path`` (whole or not at all)."""
    import gguf

    from .gguf_export import encode_tensor, file_type, require_gguf, staged_writer

    require_gguf()
    path = Path(path)
    Q = gguf.GGMLQuantizationType
    with staged_writer(gguf, path, "clip") as writer:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type(gguf, plan.out_type))  # f16 or f32
        for method, value in plan.metadata:
            getattr(writer, method)(value)
        for gguf_name, shape, _, f32 in plan.tensors:
            dtype = np.dtype(np.float32 if f32 else np.float16)
            writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize,
                                   raw_dtype=Q.F32 if f32 else Q.F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, make, f32 in plan.tensors:
            writer.write_tensor_data(encode_tensor(gguf, make().float(), Q.F32 if f32 else Q.F16))
    return path


_SIGLIP = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "post_layernorm.weight": "v.post_ln.weight",
    "post_layernorm.bias": "v.post_ln.bias",
}
_SIGLIP_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                 "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def _siglip_names(key: str) -> list[tuple[str, Callable]] | None:
    """The GGUF name of a SigLIP tower's tensor (key relative to the tower): [] for the unused pooling head,
    None for a tensor llama.cpp has no place for."""
    if key.startswith("head."):
        return []
    if key in _SIGLIP:
        return [(_SIGLIP[key], _same)]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _SIGLIP_LAYER:
        return [(f"v.blk.{m.group(1)}.{_SIGLIP_LAYER[m.group(2)]}.{m.group(3)}", _same)]
    return None


# Qwen2-VL's blocks (fc1/fc2) and Qwen2.5-VL's (a gated MLP) as llama.cpp's qwen2vl graph names them
_QWEN_VL_LAYER = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down",
                  "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


def _qwen_vl_names(key: str) -> list[tuple[str, Callable]] | None:
    """Qwen2-VL's and Qwen2.5-VL's towers as llama.cpp's qwen2vl graph reads them: the temporal Conv3d as two Conv2d
    weights (one per frame of the pair), each block's fused ``qkv`` as its query, key and value thirds."""
    if key == "patch_embed.proj.weight":
        return [("v.patch_embd.weight", lambda t: t[:, :, 0].contiguous()),
                ("v.patch_embd.weight.1", lambda t: t[:, :, 1].contiguous())]
    m = _BLOCK_KEY.fullmatch(key)
    if m is None:
        return None
    block, part, kind = m.groups()
    if part == "attn.qkv":
        return [(f"v.blk.{block}.attn_{x}.{kind}", lambda t, i=i: t.chunk(3, dim=0)[i].contiguous())
                for i, x in enumerate("qkv")]
    if part in _QWEN_VL_LAYER:
        return [(f"v.blk.{block}.{_QWEN_VL_LAYER[part]}.{kind}", _same)]
    return None


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _plus_one(t: torch.Tensor) -> torch.Tensor:
    return t.float() + 1


def _metadata(spec: _Projector, config, vision, text, processor: dict) -> list[tuple[str, object]]:
    """The projector file's metadata as llama.cpp's graph for ``spec`` reads it; refuses settings it would
    compute differently."""
    common = [("add_clip_has_vision_encoder", True), ("add_clip_projector_type", spec.clip_type),
              ("add_vision_projection_dim", text.hidden_size), ("add_vision_patch_size", vision.patch_size),
              ("add_vision_image_mean", [float(v) for v in processor["image_mean"]]),
              ("add_vision_image_std", [float(v) for v in processor["image_std"]])]
    if spec.clip_type == "qwen2vl_merger":
        _check_activation(vision, ("quick_gelu",), "GELU_QUICK (x * sigmoid(1.702 x))")
        return common + _qwen_vl_common(vision, config.model_type) + [
            ("add_vision_embedding_length", vision.embed_dim),
            ("add_vision_feed_forward_length", int(vision.embed_dim * vision.mlp_ratio))]
    if spec.clip_type == "qwen2.5vl_merger":
        _check_activation(vision, ("silu",), "SiLU")
        return common + _qwen_vl_common(vision, config.model_type) + [
            ("add_vision_embedding_length", vision.hidden_size),
            ("add_vision_feed_forward_length", vision.intermediate_size), ("add_vision_use_silu", True),
            ("add_vision_n_wa_pattern", _window_pattern(vision))]
    _check_activation(vision, ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"), "the tanh GELU (gelu_pytorch_tanh)")
    # Gemma 3 average-pools square blocks of patches down to mm_tokens_per_image (llama.cpp's default block is 4)
    side = vision.image_size // vision.patch_size
    tokens_side = int(round(config.mm_tokens_per_image ** 0.5))
    if tokens_side ** 2 != config.mm_tokens_per_image or side % tokens_side:
        raise UsageError(f"Gemma 3's mm_tokens_per_image ({config.mm_tokens_per_image}) must be a square whose "
                         f"side divides the {side} patches per side: llama.cpp pools square blocks")
    return common + [
        ("add_vision_image_size", vision.image_size), ("add_vision_embedding_length", vision.hidden_size),
        ("add_vision_feed_forward_length", vision.intermediate_size),
        ("add_vision_block_count", vision.num_hidden_layers), ("add_vision_head_count", vision.num_attention_heads),
        ("add_vision_attention_layernorm_eps", vision.layer_norm_eps), ("add_vision_use_gelu", True),
        ("add_vision_projector_scale_factor", side // tokens_side)]


def _qwen_vl_common(vision, family: str) -> list[tuple[str, object]]:
    """The settings Qwen2-VL's and Qwen2.5-VL's towers share, refusing those llama.cpp's qwen2vl graph hard-codes
    otherwise: two frames' patch weights, 2x2 patches merged, vision RoPE base 10000."""
    theta = (getattr(vision, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    for what, value, computed in (("temporal_patch_size", vision.temporal_patch_size, 2),
                                  ("spatial_merge_size", vision.spatial_merge_size, 2),
                                  ("rope_parameters.rope_theta", theta, 10000.0)):
        if value != computed:
            raise UsageError(f"this {family} model's {what} is {value} (config.json's vision_config); llama.cpp's "
                             f"encoder for it computes with {computed} and would give different image embeddings. "
                             f"Refusing to export.")
    return [("add_vision_image_size", 560),  # llama.cpp sizes each image itself; this is its converter's value
            ("add_vision_block_count", vision.depth), ("add_vision_head_count", vision.num_heads),
            ("add_vision_attention_layernorm_eps", 1e-6),  # transformers' towers' norms (LayerNorm, RMS norm)
            ("add_vision_spatial_merge_size", vision.spatial_merge_size)]


# llama.cpp's qwen2.5vl encoder reads no window size: its windows are 112 pixels (Qwen2.5-VL's own value)
_QWEN25_WINDOW = 112


def _window_pattern(vision) -> int:
    """llama.cpp's ``n_wa_pattern`` for Qwen2.5-VL: block ``i`` attends over the whole image when ``(i + 1) % n`` is
    0, within its window otherwise; ``fullatt_block_indexes`` must be that set (``depth + 1``: none is full)."""
    if vision.window_size != _QWEN25_WINDOW:
        raise UsageError(f"this Qwen2.5-VL model's window_size is {vision.window_size} (config.json's vision_config); "
                         f"llama.cpp's qwen2.5vl encoder attends within {_QWEN25_WINDOW}-pixel windows (it reads no "
                         f"size from the file) and would give different image embeddings. Refusing to export.")
    full = sorted({i for i in vision.fullatt_block_indexes if 0 <= i < vision.depth})  # transformers' blocks
    n = full[0] + 1 if full else vision.depth + 1
    if full != [i for i in range(vision.depth) if (i + 1) % n == 0]:
        raise UsageError(f"this Qwen2.5-VL model's fullatt_block_indexes is {vision.fullatt_block_indexes} (of "
                         f"{vision.depth} blocks, config.json's vision_config); llama.cpp's qwen2.5vl encoder makes "
                         f"every n-th block a full-attention one (n_wa_pattern) and cannot express it. Refusing to "
                         f"export.")
    return n


def _check_activation(vision, computed: tuple[str, ...], what: str) -> None:
    """The tower's activation must be the one llama.cpp's graph computes."""
    act = getattr(vision, "hidden_act", computed[0])
    if act not in computed:
        raise UsageError(f"the vision tower's hidden_act is {act!r}; llama.cpp's projector graph computes {what} and "
                         f"would give different image embeddings. Refusing to export.")


def _module_path(model: nn.Module, names: tuple[str, ...]) -> str:
    for path, _ in model.named_modules():
        if path.rpartition(".")[2] in names:
            return path
    raise UsageError(f"found no {' or '.join(names)} in this {model.config.model_type} model")


def _image_processor_settings(model_dir: Path) -> dict:
    """The image processor's settings as the model folder holds them (``preprocessor_config.json``, or the
    ``image_processor`` part of ``processor_config.json``)."""
    settings: dict = {}
    for name, part in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        file = model_dir / name
        if file.is_file():
            data = read_json_object(file)
            settings.update(data.get(part, {}) if part else data)
    if "image_mean" not in settings or "image_std" not in settings:
        raise UsageError(f"{model_dir} has no image processor settings (image_mean, image_std in "
                         f"preprocessor_config.json): llama.cpp's projector file needs them")
    return settings
