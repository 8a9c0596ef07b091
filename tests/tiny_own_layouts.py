"""Tiny checkpoints of the MoE models whose experts have a layout of their own (test helper): DBRX (2-D
``(E * I, H)`` stacks), JetMoE (parallel experts in its MLP and attention) and LongCat-Flash (zero experts)."""

from __future__ import annotations

from pathlib import Path

import torch

# Each field as the model type's config names it; 64-wide layers (a 4-bit block) where bitsandbytes reads them.
# No ffn_config hidden_size for DBRX: 4.x's DbrxFFNConfig refuses the key, 5.x copies d_model into it.
FIELDS = {
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
    "jetmoe": dict(hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=64,
                   num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256),
    "longcat_flash": dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=32,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8, ffn_hidden_size=64,
                          expert_ffn_hidden_size=64, n_routed_experts=4, zero_expert_num=2, moe_topk=2,
                          max_position_embeddings=256),
}


def save_tiny(out: Path, tokenizer, model_type: str) -> Path:
    """Save a 2-layer ``model_type`` model with 4 experts, random non-trivial weights, and ``tokenizer``."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                               pad_token_id=0, **FIELDS[model_type])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
