"""DeepSeek-V2/V3 (multi-head latent attention, MLA) as llama.cpp's ``deepseek2`` architecture reads them.

llama.cpp runs MLA "absorbed": keys and values are the compressed latent (``kv_lora_rank`` wide) plus one
shared RoPE key, so the file says one key/value head of ``kv_lora_rank + qk_rope_head_dim`` (keys) and
``kv_lora_rank`` (values), with the per-head sizes after decompression as the ``*_mla`` lengths. transformers'
``kv_b_proj`` (``[heads * (nope + v), kv_lora_rank]``, each head's key rows then its value rows) is split
into ``attn_k_b`` (``[heads, kv_lora_rank, nope]``, transposed) and ``attn_v_b`` (``[heads, v, kv_lora_rank]``),
as llama.cpp's converter writes it.

Routing as llama.cpp's graph computes it from metadata: softmax (V2) or sigmoid with a selection bias
(V3's ``e_score_correction_bias``, ``exp_probs_b``) scores, top-k within the best ``topk_group`` of ``n_group``
groups (a group scored by its two best experts, as V3 does; V2's ``group_limited_greedy`` scores a group by
its best expert and is refused), optional renormalization (``norm_topk_prob``: V3 only, V2's router never
renormalizes) and ``routed_scaling_factor``; the first ``first_k_dense_replace`` layers are dense MLPs and every
MoE layer adds its shared experts.

RoPE rotates interleaved pairs in llama.cpp, as DeepSeek's weights are laid out (V2 always; V3 with
``rope_interleave``); a V3 checkpoint with ``rope_interleave=False`` has its RoPE rows reordered to pairs.
YaRN: llama.cpp scales attention by ``mscale(factor, mscale_all_dim) ** 2`` as transformers does, but always
assumes ``mscale == mscale_all_dim`` (the released configs); a config whose cos/sin scale differs is refused.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError

RENAME = ((".mlp.gate.e_score_correction_bias", ".mlp.gate.e_score_correction.bias"),)


def write_attention(writer, config) -> int:
    """MLA's sizes as llama.cpp's deepseek2 reads them; returns the RoPE width."""
    rope, nope, v = config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
    rank = config.kv_lora_rank
    writer.add_head_count_kv(1)  # absorbed MLA: one latent key/value "head" shared by all queries
    writer.add_key_length(rank + rope)
    writer.add_value_length(rank)
    writer.add_key_length_mla(nope + rope)
    writer.add_value_length_mla(v)
    writer.add_q_lora_rank(config.q_lora_rank or 0)  # 0: a plain q_proj (V2-Lite)
    writer.add_kv_lora_rank(rank)
    if getattr(config, "attention_bias", False):
        raise UsageError(f"this {config.model_type} config has attention_bias=True, but llama.cpp's deepseek2 "
                         f"loads no attention biases; the GGUF would compute differently. Refusing to export.")
    return rope


def write_experts(writer, config, arch: str = "deepseek2") -> None:
    """Experts, shared experts, leading dense layers and routing, for llama.cpp's ``arch`` (deepseek2, or GLM-4.5's
    glm4moe, which routes as V3 does); refuse routing llama.cpp computes otherwise."""
    import gguf

    v3 = config.model_type != "deepseek_v2"  # sigmoid scores with a selection bias (V3, GLM-4.5)
    n_expert = getattr(config, "n_routed_experts", None)
    if not n_expert:
        raise UsageError(f"this {config.model_type} config has no routed experts (n_routed_experts), which "
                         f"llama.cpp's {arch} needs. Refusing to export.")
    if not getattr(config, "n_shared_experts", None):  # V2 builds its MoE layers without them then
        raise UsageError(f"this {config.model_type} config has no shared experts (n_shared_experts is "
                         f"{getattr(config, 'n_shared_experts', None)}), and llama.cpp's {arch} requires them in "
                         f"every MoE layer: it would not load the GGUF. Refusing to export.")
    writer.add_leading_dense_block_count(config.first_k_dense_replace or 0)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_weights_scale(float(config.routed_scaling_factor or 1.0))
    writer.add_expert_weights_norm(bool(v3 and config.norm_topk_prob))  # V2's router never renormalizes
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    groups, used = config.n_group or 1, config.topk_group or 1
    limited = groups > 1 and used < groups and (v3 or config.topk_method == "group_limited_greedy")
    if limited and not v3:
        raise UsageError(f"this DeepSeek-V2 config routes with group_limited_greedy ({used} of {groups} groups), "
                         f"which picks groups by their best expert; llama.cpp's {arch} picks them by the sum of "
                         f"their two best, so the GGUF would route differently. Refusing to export.")
    if limited:
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(used)


def check_yarn(config, rope: dict, attention_factor: float) -> None:
    """Write YaRN's attention-scale exponent (``mscale_all_dim``) as llama.cpp's deepseek2 reads it, after checking
    that transformers' cos/sin scale (``attention_factor``) is the one llama.cpp assumes."""
    factor, all_dim = rope["factor"], rope.get("mscale_all_dim") or 0.0
    expected = 1.0 if all_dim else 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if abs(attention_factor - expected) > 1e-6:
        raise UsageError(f"this {config.model_type} config scales YaRN's cos/sin by {attention_factor:.6g} (mscale="
                         f"{rope.get('mscale')}, mscale_all_dim={rope.get('mscale_all_dim')}), but llama.cpp's "
                         f"deepseek2 assumes mscale equals mscale_all_dim and would scale by {expected:.6g}. "
                         f"Refusing to export.")


def split_kv_b(rows: list, config) -> list:
    """transformers' ``kv_b_proj.weight`` rows as llama.cpp's ``k_b_proj`` (transposed) and ``v_b_proj`` rows."""
    heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    out = []
    for key, shape, make in rows:
        if not key.endswith("self_attn.kv_b_proj.weight"):
            out.append((key, shape, make))
            continue
        rank = shape[1]
        stem = key.removesuffix("kv_b_proj.weight")

        def part(i: int, make=make, rank=rank) -> torch.Tensor:
            k, val = make().reshape(heads, nope + v, rank).split([nope, v], dim=1)
            return k.transpose(1, 2).contiguous() if i == 0 else val.contiguous()

        out.append((stem + "k_b_proj.weight", (heads, rank, nope), lambda part=part: part(0)))
        out.append((stem + "v_b_proj.weight", (heads, v, rank), lambda part=part: part(1)))
    return out


def to_interleaved_rope(key: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """A V3 checkpoint with ``rope_interleave=False`` (rotate-half RoPE): its RoPE rows of the query projection
    (each head's last ``qk_rope_head_dim``) and of ``kv_a_proj_with_mqa`` (its last ``qk_rope_head_dim``) reordered
    to the interleaved pairs llama.cpp rotates."""
    if config.model_type != "deepseek_v3" or getattr(config, "rope_interleave", True):
        return tensor
    rope = config.qk_rope_head_dim
    if key.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        heads = config.num_attention_heads
        t = tensor.reshape(heads, -1, *tensor.shape[1:]).clone()
        t[:, -rope:] = _pairs(t[:, -rope:], dim=1)
        return t.reshape(tensor.shape)
    if key.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        t = tensor.clone()
        t[-rope:] = _pairs(t[-rope:], dim=0)
        return t
    return tensor


def _pairs(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """``[first halves | second halves]`` along ``dim`` -> alternating pairs."""
    shape = rows.shape
    half = shape[dim] // 2
    split = rows.reshape(*shape[:dim], 2, half, *shape[dim + 1:])
    return split.transpose(dim, dim + 1).reshape(shape)
