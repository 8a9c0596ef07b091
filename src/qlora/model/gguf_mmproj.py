"""A vision-language model's image encoder as llama.cpp's projector file (``mmproj``).

llama.cpp runs a VLM from two files: the language model (:mod:`qlora.model.gguf_export`) and a ``clip``
GGUF holding the vision tower and the projector that maps its features into the language model's embedding
space, as ``convert_hf_to_gguf.py --mmproj`` writes it. Its ``clip.projector_type`` picks the graph llama.cpp
(``libmtmd``) builds; the tensor names, metadata keys and conventions here are those that graph reads.

Written: Gemma 3 (``gemma3``: a SigLIP tower, its patches average-pooled, Gemma's RMS norm, a projection),
checked against llama.cpp's own encoder. Other VLMs are refused by name (:func:`mmproj_refusal`) rather than
written in a layout llama.cpp might misread.

The tensors are the merged model's (:func:`qlora.model.merge.merged_tensors`): a projector an adapter trained
whole (``modules_to_save``) is the one written, as adapters are folded into the language model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    projector: tuple[str, ...]
    tensors: dict[str, str]  # projector key (relative) -> GGUF name


_PROJECTORS = {
    "gemma3": _Projector("gemma3", ("vision_tower",), ("multi_modal_projector",),
                         {"mm_input_projection_weight": "mm.input_projection.weight",
                          "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"}),
}

# VLM families whose language model qlora exports but whose projector it does not write, and why (Qwen2-VL's
# family is refused whole: its M-RoPE language model is not written).
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
_GENERIC = "qlora writes llama.cpp projector files for Gemma 3 only; this family's is not checked against llama.cpp's"


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


def export_mmproj(model: nn.Module, model_dir: str | Path, path: str | Path, out_type: str = "f16",
                  name: str | None = None) -> Path:
    """Write ``model``'s vision tower and projector (adapters folded in) as llama.cpp's ``mmproj`` GGUF.

    ``out_type`` (``f32`` or ``f16``) is the matrices' type; embeddings, norms and biases are f32.
    ``model_dir`` holds the image processor's mean and std, which llama.cpp normalizes pixels with.

    Raises:
        UsageError: a family without a projector layout here, or settings llama.cpp cannot represent.
    """
    import gguf

    from .gguf_export import encode_tensor, require_gguf

    require_gguf()
    config = model.config
    refusal = mmproj_refusal(model)
    if refusal is not None or not is_vision_language(model):
        raise UsageError(f"no llama.cpp projector for a {config.model_type} model: {refusal or 'no vision tower'}")
    spec = _PROJECTORS[config.model_type]
    vision, text = config.vision_config, config.get_text_config()
    if out_type not in TYPES:
        raise UsageError(f"unknown projector type {out_type!r}; choose from {', '.join(TYPES)}")
    path = Path(path)
    processor = _image_processor_settings(Path(model_dir))
    _check_activation(vision)

    rows = merged_tensors(model)
    tower, projector = _module_path(model, spec.tower), _module_path(model, spec.projector)
    plan: list[tuple[str, tuple[int, ...], object]] = []
    unknown = []
    for key, shape, make in rows:
        if key.startswith(tower + "."):
            gguf_name = _siglip_name(key[len(tower) + 1:])
        elif key.startswith(projector + "."):
            gguf_name = spec.tensors.get(key[len(projector) + 1:], "")
        else:
            continue
        if gguf_name is None:
            continue  # SigLIP's pooling head: unused by these models
        if not gguf_name:
            unknown.append(key)
            continue
        plan.append((gguf_name, tuple(shape), make))
    if unknown:
        raise UsageError(f"the vision encoder has tensors llama.cpp's {spec.clip_type} projector has no place for: "
                         f"{', '.join(unknown[:5])}. This checkpoint is a variant qlora does not export.")

    Q = gguf.GGMLQuantizationType
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, "clip")
    try:
        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name or path.stem)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        _write_metadata(writer, spec, config, vision, text, processor)
        typed = []
        for gguf_name, shape, make in plan:
            # embeddings stay f32 as llama.cpp's converter keeps them (its encoder rounds the patch weights itself)
            f32 = (out_type == "f32" or len(shape) == 1 or gguf_name.startswith(("v.patch_embd", "v.position_embd"))
                   or gguf_name.endswith("_norm.weight"))
            typed.append((gguf_name, shape, make, Q.F32 if f32 else Q.F16))
        for gguf_name, shape, _, qtype in typed:
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, _, make, qtype in typed:
            t = make().float()
            if gguf_name == "mm.soft_emb_norm.weight":
                t = t + 1  # Gemma's RMS norm scales by 1 + w; llama.cpp's multiplies by the stored weight
            writer.write_tensor_data(encode_tensor(gguf, t, qtype))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
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


def _siglip_name(key: str) -> str | None:
    """The GGUF name of a SigLIP tower's tensor (key relative to the tower); None for the unused pooling
    head, "" for a tensor llama.cpp has no place for."""
    if key.startswith("head."):
        return None
    if key in _SIGLIP:
        return _SIGLIP[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _SIGLIP_LAYER:
        return f"v.blk.{m.group(1)}.{_SIGLIP_LAYER[m.group(2)]}.{m.group(3)}"
    return ""


def _write_metadata(writer, spec: _Projector, config, vision, text, processor: dict) -> None:
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(spec.clip_type)
    writer.add_vision_projection_dim(text.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_use_gelu(True)
    writer.add_vision_image_mean([float(v) for v in processor["image_mean"]])
    writer.add_vision_image_std([float(v) for v in processor["image_std"]])
    # Gemma 3 average-pools square blocks of patches down to mm_tokens_per_image (llama.cpp's default block is 4)
    side = vision.image_size // vision.patch_size
    tokens_side = int(round(config.mm_tokens_per_image ** 0.5))
    if tokens_side ** 2 != config.mm_tokens_per_image or side % tokens_side:
        raise UsageError(f"Gemma 3's mm_tokens_per_image ({config.mm_tokens_per_image}) must be a square whose "
                         f"side divides the {side} patches per side: llama.cpp pools square blocks")
    writer.add_vision_projector_scale_factor(side // tokens_side)


def _check_activation(vision) -> None:
    """llama.cpp's ``use_gelu`` is the tanh approximation, SigLIP's default; another activation would differ."""
    act = getattr(vision, "hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise UsageError(f"the vision tower's hidden_act is {act!r}; llama.cpp's projector graph computes the tanh "
                         f"GELU (gelu_pytorch_tanh) and would give different image embeddings. Refusing to export.")


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
