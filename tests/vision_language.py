"""Tiny vision-language checkpoints, saved as transformers writes the hub's (test helper).

Each has a real vision tower and projector beside its language model, so the
tests see the module layout of Gemma 3, Mistral 3, LLaVA, Qwen2.5-VL, Llama 4 and Llama 3.2
Vision checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch

_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256, head_dim=16)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
               patch_size=14)


def _spec(kind: str, v: int, text: dict) -> dict:
    """Config arguments of a ``kind`` model whose image tokens follow a ``v``-token vocabulary."""
    if kind == "gemma3":  # query_pre_attn_scalar = head_dim: the value llama.cpp assumes for small Gemmas
        return dict(text_config=dict(text, model_type="gemma3_text", query_pre_attn_scalar=16),
                    vision_config=dict(_VISION, model_type="siglip_vision_model"), mm_tokens_per_image=4,
                    image_token_index=v, boi_token_index=v + 1, eoi_token_index=v + 2)
    if kind == "mistral3":
        return dict(text_config=dict(text, model_type="mistral"), spatial_merge_size=2, image_token_index=v,
                    vision_config=dict(_VISION, model_type="pixtral", head_dim=16, num_hidden_layers=1))
    if kind == "llava":
        return dict(text_config=dict(text, model_type="llama"), image_token_index=v,
                    vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32))
    if kind == "qwen2_5_vl":
        return dict(text_config=dict(text, model_type="qwen2_5_vl_text",
                                     rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
                    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                       out_hidden_size=64, fullatt_block_indexes=[0]),
                    image_token_id=v, video_token_id=v + 1, vision_start_token_id=v + 2)
    if kind == "llama4":
        return dict(text_config=dict(text, model_type="llama4_text", num_local_experts=2, intermediate_size_mlp=128,
                                     interleave_moe_layer_step=1, attention_chunk_size=64),
                    vision_config=dict(_VISION, vision_output_dim=64, projector_input_dim=64,
                                       projector_output_dim=64), image_token_index=v)
    if kind == "mllama":  # Llama 3.2 Vision: cross-attention layers inside the language model
        return dict(text_config=dict(text, model_type="mllama_text_model", cross_attention_layers=[1],
                                     rope_scaling={"rope_type": "default"}),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                       attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                                       intermediate_layers_indices=[0], max_num_tiles=1,
                                       supported_aspect_ratios=[[1, 1]]), image_token_index=v)
    raise ValueError(kind)


def build_tiny_vlm(out_dir: str | Path, tokenizer, kind: str, seed: int = 0) -> Path:
    """Save a random ``kind`` vision-language model (``AutoModelForImageTextToText``) and ``tokenizer``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    v = len(tokenizer)
    text = dict(_TEXT, vocab_size=v + 8, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(kind, **_spec(kind, v, text))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
