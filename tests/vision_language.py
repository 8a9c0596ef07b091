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
    if kind == "ernie4_5_vl_moe":  # text and vision experts, routed by token modality; 3-D rotary sections
        return dict(text_config=dict(text, moe_intermediate_size=[32, 32], mlp_layer_types=["dense", "sparse"],
                                     moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                      "mrope_section": [3, 3, 2]}),
                    vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64),
                    image_token_id=v, image_start_token_id=v + 1, image_end_token_id=v + 2)
    if kind == "granite4_vision":  # vision features injected into chosen language-model layers (deepstack)
        return dict(text_config=text, vision_config=dict(_VISION, hidden_size=64, num_hidden_layers=2),
                    qformer_config=dict(intermediate_size=64), deepstack_layer_map=[[-1, 0], [-2, 1]],
                    spatial_target_layers=[0, 1, 0, 1], downsample_rate="1/2", image_grid_pinpoints=[[56, 56]],
                    image_token_index=v)
    if kind == "dots3_note":  # MLA text layers, indexed and sliding, beside vision and audio towers
        mla = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, v_head_dim=16)
        return dict(text_config=dict(text, num_key_value_heads=4, qk_rope_head_dim=8, index_topk=4, index_head_dim=16,
                                     index_n_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, shared_experts_intermediate_size=32, sliding_window=4,
                                     layer_types=["indexed_attention", "sliding_attention"],
                                     mlp_layer_types=["dense", "sparse"], swa_num_attention_heads=4,
                                     swa_num_key_value_heads=4, swa_head_dim=16,
                                     **mla, **{f"swa_{k}": n for k, n in mla.items()}),
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       moe_intermediate_size=32, pyramid_num_routed=[-1, 4], adapter_in_dim=32,
                                       adapter_out_dim=64),
                    audio_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      downsample_hidden_size=32, adapter_input_size=32, adapter_out_dim=64,
                                      feature_size=16), image_token_id=v)
    if kind == "janus":  # an understanding tower and a VQ image generator beside the language model
        return dict(text_config=dict(text, model_type="llama"), image_token_id=v,
                    vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                       patch_size=16, projection_dim=64, num_image_tokens=4, mlp_ratio=2),
                    vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32,
                                   channel_multiplier=[1, 2], num_res_blocks=1, num_patches=2, projection_dim=64,
                                   image_token_embed_dim=64))
    if kind in ("muse_glimmer", "muse_spark"):  # Muse Spark: experts, and an audio tower
        spark = kind == "muse_spark"
        return dict(text_config=dict(text, **dict(moe_hidden_size=32, moe_intermediate_size=32, num_local_experts=4,
                                                  num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"],
                                                  layer_types=["sliding_attention", "full_attention"],
                                                  sliding_window=4) if spark else {}),
                    vision_config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       pos_emb_height=4, pos_emb_width=4, max_position_embeddings=16),
                    out_hidden_size=64, projector_hidden_size=64, image_token_id=v, video_token_id=v + 1,
                    **dict(audio_config=dict(patch_sizes=[4, 2], hidden_sizes=[16, 32], depths=[1, 1],
                                             num_hidden_layers=2, out_hidden_size=64),
                           audio_token_id=v + 2) if spark else {})
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
