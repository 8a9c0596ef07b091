"""Tiny MoE checkpoints of any transformers model type, with non-trivial random weights (test helper)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Set where the model type's config has the field: the names differ between MoE families.
MOE = dict(moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
           shared_expert_intermediate_size=32, head_dim=8, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
           qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1,
           intermediate_size_mlp=48, attention_chunk_size=8)


def save_tiny_moe(out: Path, tokenizer, model_type: str, **overrides) -> Path:
    """Save a 2-layer ``model_type`` MoE with 4 experts and ``tokenizer`` to ``out`` (``overrides``: config fields)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **CONFIG)
    for key, value in MOE.items():
        if hasattr(cfg, key) and not isinstance(getattr(type(cfg), key, None), property):  # Falcon's head_dim
            setattr(cfg, key, value)
    if model_type.startswith("deepseek"):  # multi-head latent attention: as many key/value heads as heads
        cfg.num_key_value_heads = cfg.num_attention_heads
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random, non-trivial weights everywhere (norms and biases included)
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_moe_factory(tmp_path_factory, tokenizer) -> Callable[[str], Path]:
    """``get(model_type)``: the folder of that tiny MoE, built once per factory."""
    cache: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in cache:
            cache[model_type] = save_tiny_moe(tmp_path_factory.mktemp(model_type), tokenizer, model_type)
        return cache[model_type]
    return get
