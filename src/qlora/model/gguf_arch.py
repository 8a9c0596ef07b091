"""How each supported transformers architecture is laid out in a llama.cpp GGUF file.

The facts here are llama.cpp's conventions (its ``convert_hf_to_gguf.py`` and
model loaders), restated for the architectures qlora exports:

- Tensor names come from ``gguf``'s own HF-to-GGUF name table, so they follow
  llama.cpp as the ``gguf`` package is updated.
- Llama, Mistral, Mixtral (written as llama.cpp's ``llama`` architecture),
  Granite, Granite MoE, SmolLM3, OLMo and Arcee use interleaved ("normal") RoPE in llama.cpp,
  HF uses rotate-half: each head's rows of ``q_proj``/``k_proj`` are reordered
  from ``[first halves | second halves]`` to alternating pairs. Qwen2/3 (and
  their MoEs), Gemma 1/2/3, Phi-3, OLMo 2 and OLMoE use NeoX RoPE: no reorder.
- Gemma's RMSNorm scales by ``1 + w``; llama.cpp's by ``w``: norm weights are
  written as ``w + 1``.
- Granite's embedding, residual, attention and logit multipliers are metadata
  llama.cpp's granite graphs apply. SmolLM3 skips RoPE on every 4th layer in
  llama.cpp (a fixed step); another ``no_rope_layers`` pattern is refused.
- Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are written fused, as
  llama.cpp reads them.
- Gemma 2 has no separate output matrix in llama.cpp (it always reuses the
  embedding), so an untied Gemma 2 head cannot be written and is refused.
- Gemma 2/3 attention scale is fixed by llama.cpp (1/sqrt(head_dim), or
  1/sqrt(hidden/heads) for the 27B layer counts); a config whose
  ``query_pre_attn_scalar`` differs would run differently there and is refused.
- Mixture of experts (Mixtral as ``llama`` with experts, Qwen2-MoE, Qwen3-MoE,
  OLMoE, Granite MoE, gpt-oss): the experts of a layer are three 3-D tensors
  ``ffn_gate_exps``, ``ffn_up_exps`` (each ``[experts, ff, hidden]``) and
  ``ffn_down_exps``; the router is ``ffn_gate_inp``. transformers' fused
  ``gate_up_proj`` is split, gate half first (the order its forward chunks it
  in). llama.cpp's graph for each architecture hard-codes whether the top-k
  routing weights are renormalized (Mixtral, Qwen3-MoE and Granite MoE yes,
  Qwen2-MoE and OLMoE no), so a config asking the other (``norm_topk_prob``) is
  refused, as are checkpoints with dense MLP layers between the sparse ones
  (``mlp_only_layers``, ``decoder_sparse_step``), which those graphs do not have.
- Qwen2-MoE, OLMoE and OLMo 2 need an output matrix even when it is tied to the
  embedding: the embedding is written twice.
- Phi-2 (``phi``), StarCoder2, StableLM, Command-R (``cohere``), Cohere 2, OLMo
  (v1) use LayerNorm (with a bias, except Cohere's and OLMo's weightless one):
  their eps is written as ``layer_norm_epsilon``. Phi-2, Command-R and Cohere 2
  run attention and MLP in parallel from one norm, as transformers does.
- Partial rotary (Phi-2, StableLM, GLM-4) writes the rotated width as the RoPE
  dimension count; architectures whose llama.cpp graph asserts full rotation
  refuse a partial factor. Command-R/Cohere 2, GLM-4 and ERNIE 4.5 rotate
  interleaved pairs in transformers too (no reorder); OLMo and Arcee are
  reordered like Llama (above); the rest are NeoX.
- Command-R and Cohere 2 multiply the logits by ``logit_scale`` and always use
  the embedding as output layer; llama.cpp's command-r has Q/K norms exactly
  when a model has 64 or more layers (Command R+), so ``use_qk_norm`` must agree.
  Cohere 2 applies RoPE on its sliding layers only, in both.
- GLM-4's fused ``gate_up_proj`` is written fused (``ffn_up``), gate half first.
- llama.cpp's gemma2 always soft-caps attention scores and final logits, its gemma3 never: a config that caps
  otherwise is refused.
- llama.cpp's gemma2, gemma3 and cohere2 place sliding-window layers by a fixed period (every 2nd, 6th, 4th layer
  full attention; their loaders take no per-layer pattern from the file): other ``layer_types`` are refused.
  EXAONE 4 with a ``sliding_window`` skips RoPE on its full-attention layers in transformers; llama.cpp's exaone4
  does that, with every 4th layer full, at 64 layers only (the 32B), and ropes every layer at other depths.
- A config switch a graph does not compute (``ArchSpec.requires``: biases
  llama.cpp does not load, per-head Q/K LayerNorm, sliding windows) and an
  activation other than the graph's (``ArchSpec.acts``) are refused.
- GPT-2, GPT-NeoX (Pythia), Falcon and BLOOM fuse Q, K and V into one matrix, as llama.cpp does, but HF groups
  its rows per key/value head (GPT-NeoX, BLOOM: each head's q, k, v; Falcon: each group's queries, then its key
  and value) where llama.cpp reads all queries, all keys, all values: the rows are regrouped. Falcon has one
  key/value head when ``multi_query`` (7B), ``num_kv_heads`` in the new decoder architecture (40B, whose
  ``ln_attn``/``ln_mlp`` are llama.cpp's ``attn_norm_2``/``attn_norm``), else one per query head; llama.cpp's
  falcon loads no biases and always runs attention and MLP in parallel. GPT-2's ``Conv1D`` matrices are stored
  ``[in, out]`` and written transposed; its learned positions are ``position_embd``. BLOOM's ALiBi slopes are
  those of llama.cpp's fixed maximum bias 8; its embedding LayerNorm is ``token_embd_norm``. Neither has RoPE
  metadata. GPT-NeoX's ``use_parallel_residual`` is metadata its graph reads; it needs ``output.weight``.
  Hunyuan (dense) normalizes Q and K per head after RoPE, as llama.cpp's hunyuan-dense does; its "dynamic" RoPE
  with a fixed ``alpha`` is a larger base (``theta * alpha ** (d / (d - 2))``), written as the base.
  Apertus's xIELU activation has four learned scalars per layer (``act_fn.alpha_n``, ``alpha_p``, ``beta``,
  ``eps``): llama.cpp reads them as per-layer ``xielu_*`` metadata, stored as HF stores them (before the softplus
  both apply). Its Q/K norms precede NeoX RoPE; Llama 3.1 RoPE scaling is ``rope_freqs`` as for Llama.
  Pythia and Falcon use exact GELU; llama.cpp computes the tanh approximation for them (as its converter writes
  them), which differs by less than 5e-4: accepted, unlike a checkpoint switching another architecture to it.
- gpt-oss: transformers' experts are transposed (``[experts, in, out]``) and the fused ``gate_up_proj``
  alternates gate and up rows; llama.cpp reads ``[experts, out, in]`` stacks with per-expert biases, a router
  bias and per-head attention sinks. Its graph hard-codes the clamped SwiGLU constants (alpha 1.702, limit 7),
  softmax over the top-k router logits, NeoX RoPE and a sliding window on even layers: configs that differ
  are refused. llama.cpp rounds YaRN's correction range to whole dimensions whatever ``truncate`` says (the
  released configs say false); as its own converter, the export writes them anyway (see docs/gguf.md).
- MPT: ALiBi with the maximum bias 8 transformers' port always uses (llama.cpp reads it as metadata and its slopes
  then equal transformers' for any head count), ``clip_qkv`` as ``clamp_kqv``, the fused ``Wqkv`` already all Q,
  all K, all V. Ministral runs as ``llama``: full attention, the same as its sliding windows only where no window
  is shorter than the context. GPT-J has a llama.cpp name but no implementation: refused as such.
- DBRX: its experts are 2-D ``(experts * ff, hidden)`` stacks; ``w1``/``v1`` are viewed ``[experts, ff, hidden]``
  (gate, up) and ``w2`` (applied as ``x @ w2_e``) viewed so and transposed to ``[experts, hidden, ff]`` (down), as
  llama.cpp's converter does. Its router renormalizes the top-k softmax weights by their
  ``moe_normalize_expert_weights``-norm; llama.cpp's dbrx divides by their sum, the same for p = 1 (the released
  configs) only. ``clip_qkv`` is ``clamp_kqv`` (0 for none: llama.cpp's loader requires the key). LayerNorm eps
  is the fixed 1e-5 of transformers' DBRX.
- DeepSeek-V2/V3 (multi-head latent attention, llama.cpp's ``deepseek2``): :mod:`qlora.model.gguf_deepseek`.
  GLM-4.5 (``glm4moe``) routes as V3 does (sigmoid scores, selection bias, groups, shared experts, leading dense
  layers) and is written by the same code, with ordinary GQA attention and partial NeoX RoPE.
- ERNIE 4.5 MoE: softmax routing with a selection bias (``moe_statics``), renormalized as llama.cpp always does;
  its expert layers (``moe_layer_start_index``, ``moe_layer_interval``) are metadata, but llama.cpp has no last
  expert layer (``moe_layer_end_index`` before the last layer is refused). Granite MoE with shared experts is
  llama.cpp's ``granitemoe``; its fused shared ``input_linear`` (gate rows, then up) is written as two matrices
  (``ArchSpec.split_rows``). Hunyuan MoE's experts and shared MLP are ``intermediate_size`` wide; its attention and
  RoPE are dense Hunyuan's.
- MiniCPM3: DeepSeek-V2-style latent attention, which llama.cpp's minicpm3 runs decompressed (``kv_b_proj`` whole, a
  key and a value per head), NeoX RoPE on the RoPE part; it hard-codes MiniCPM's embedding, residual and logit scales
  (other values refused). LongRoPE as Phi-3's, with the original context written: llama.cpp takes the long factors
  for a context longer than it, transformers for a longer prompt.
- Llama 4 (text; of the vision-language model its language model): experts every ``interleave_moe_layer_step``-th
  layer (``intermediate_size`` wide, dense layers ``intermediate_size_mlp``), each expert's input scaled by the
  sigmoid of its top-k router logit, a shared expert; RoPE on interleaved pairs in both (no reorder), Llama 3.1
  scaling as ``rope_freqs``. llama.cpp's llama4 hard-codes 8192-token chunks, the RoPE-less layers' temperature
  tuning, a RoPE-less full-attention layer every 4th, and Q/K norms unless 128 experts: other configs are refused.
- StarCoder 1 (``gpt_bigcode``, llama.cpp's ``starcoder``): multi-query fused ``c_attn`` already all queries, the
  key, the value (the per-head layout without ``multi_query`` is refused), learned positions. Nemotron's
  LayerNorm1p scales by ``1 + w`` (written ``w + 1``, as Gemma's norms), with a bias.
- Qwen2-VL / Qwen2.5-VL (their language model, llama.cpp's ``qwen2vl``): Qwen2 whose NeoX RoPE rotates three
  contiguous sections of pairs by an image token's time, row and column (``rope.dimension_sections``; text tokens'
  three are equal). llama.cpp's qwen2vl loader reads no RMS norm epsilon and runs 0 (measured: transformers with
  epsilon 0 agrees to float precision); real checkpoints' 1e-6 is far below their activations' mean square.
- transformers 5 names Granite MoE's router and experts
  ``block_sparse_moe.router``/``.experts``, which gguf's table knows under other
  names: they are respelled before the lookup. transformers 4.x names the router ``router.layer`` and holds
  the experts' gate and up rows in one ``input_linear`` stack (gate rows first, as 5's ``gate_up_proj``), split
  as the fused shared MLP is. Its other MoE architectures keep experts as a list of per-expert MLPs, written as
  the same ``[experts, out, in]`` stacks (:mod:`qlora.model.gguf_export`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UsageError
from . import gguf_deepseek

log = logging.getLogger("qlora")


@dataclass(frozen=True)
class ArchSpec:
    """One transformers ``model_type`` as llama.cpp reads it."""

    gguf_arch: str  # gguf.MODEL_ARCH_NAMES value
    permute_qk: bool = False  # HF rotate-half RoPE -> llama.cpp interleaved RoPE
    norm_shift: float = 0.0  # added to every ``*norm.weight``
    has_output: bool = True  # llama.cpp can read a separate ``output.weight``
    softcap: bool = False  # llama.cpp's graph always soft-caps attention scores and final logits (else: never)
    swa_27b_layers: int | None = None  # layer count llama.cpp treats as the 27B (attention scale rule)
    output_required: bool = False  # llama.cpp needs ``output.weight`` even when tied to the embedding
    norm_topk: bool | None = None  # MoE: whether llama.cpp renormalizes the top-k routing weights (None: dense)
    rename: tuple[tuple[str, str], ...] = ()  # HF key parts to respell before gguf's name table is consulted
    layer_norm: bool = False  # LayerNorm (eps as ``layer_norm_epsilon``) rather than RMSNorm
    partial_rotary: bool = False  # llama.cpp's graph rotates fewer dims than head_dim if told so
    acts: tuple[str, ...] = ()  # ``hidden_act`` values llama.cpp's graph computes (empty: not checked)
    requires: tuple[tuple[str, object], ...] = ()  # config fields that must have this value (if present)
    logit_scale: bool = False  # writes ``config.logit_scale`` (Cohere)
    full_attention: bool = False  # llama.cpp's graph has no sliding-window layers: a config with some is refused
    swa_period: int = 0  # llama.cpp's fixed sliding-window layout: every n-th layer full attention, the rest sliding
    act_key: str = "hidden_act"  # the config field naming the MLP activation (a dotted path: within sub-configs)
    ff_key: str = "intermediate_size"  # the config field of the MLP width ("" or a None value: 4 x hidden)
    clip_key: str = "clip_qkv"  # the config field clamping Q, K and V (``clamp_kqv``)
    experts_key: str = ""  # the config field of the expert count ("": ``num_local_experts`` or ``num_experts``)
    top_k_key: str = "num_experts_per_tok"  # the config field of the experts used per token
    norm_topk_key: str = "norm_topk_prob"  # the config field renormalizing the top-k routing weights
    fused_qkv: bool = False  # HF's fused QKV is grouped per key/value head; llama.cpp's is all Q, all K, all V
    rope: bool = True  # False: learned positions (GPT-2) or ALiBi (BLOOM), no RoPE metadata
    transpose: tuple[str, ...] = ()  # HF key endings stored ``[in, out]`` (GPT-2's Conv1D)
    mha: bool = False  # every query head has its own key/value head (the config has no field for it)
    layer_scalars: tuple[tuple[str, str], ...] = ()  # (HF key ending, gguf writer's add_<name>): a value per layer
    gate_up_interleaved: bool = False  # the fused expert ``gate_up_proj`` alternates gate and up rows (gpt-oss)
    mla: bool = False  # DeepSeek's multi-head latent attention and routing (:mod:`qlora.model.gguf_deepseek`)
    deepseek_moe: bool = False  # DeepSeek's routing, shared experts and leading dense layers without its attention
    # (HF key ending of a fused matrix, the key endings of its equal row chunks in order): written apart
    split_rows: tuple[tuple[str, tuple[str, ...]], ...] = ()


SILU = ("silu", "swish")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GELU is the tanh approximation
# GPT-NeoX (Pythia) and Falcon were trained with exact GELU and llama.cpp runs them with its tanh one, as its own
# converter writes them: the two differ by less than 5e-4 anywhere (see docs/gguf.md).
GELU_ANY = GELU_TANH + ("gelu",)


# Granite MoE's router and experts: transformers 5's ``block_sparse_moe.router``/``.experts`` respelled as gguf's table
# knows them; 4.x's router is ``router.layer`` and its experts' gate and up rows one ``input_linear`` stack
GRANITE_MOE_RENAME = ((".block_sparse_moe.router.layer.", ".mlp.gate."), (".block_sparse_moe.router.", ".mlp.gate."),
                      (".block_sparse_moe.experts.", ".mlp.experts."))
GRANITE_MOE_SPLIT = ((".block_sparse_moe.input_linear.weight", (".mlp.experts.gate_proj", ".mlp.experts.up_proj")),)

# transformers' switch for biases on Q, K, V and the attention output, which llama.cpp's graphs for these do not load
# (at least not the output's: a file holding one fails to load there)
NO_ATTENTION_BIAS = (("attention_bias", False),)

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", permute_qk=True),
    "mistral": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2", full_attention=True),
    "qwen3": ArchSpec("qwen3", full_attention=True, requires=NO_ATTENTION_BIAS),
    # Qwen2-VL / Qwen2.5-VL's language model: Qwen2 with M-RoPE (rope.dimension_sections). llama.cpp's qwen2vl
    # loader reads no RMS norm epsilon (it runs 0): real checkpoints' 1e-6 is far below their activations' scale
    "qwen2_vl_text": ArchSpec("qwen2vl", full_attention=True),
    "qwen2_5_vl_text": ArchSpec("qwen2vl", full_attention=True),
    "gemma2": ArchSpec("gemma2", norm_shift=1.0, has_output=False, softcap=True, swa_27b_layers=46,
                       swa_period=2, requires=NO_ATTENTION_BIAS),
    "gemma3_text": ArchSpec("gemma3", norm_shift=1.0, swa_27b_layers=62, swa_period=6, requires=NO_ATTENTION_BIAS),
    "phi3": ArchSpec("phi3"),
    "gemma": ArchSpec("gemma", norm_shift=1.0, has_output=False, requires=NO_ATTENTION_BIAS),
    "olmo2": ArchSpec("olmo2", output_required=True, requires=NO_ATTENTION_BIAS),
    "granite": ArchSpec("granite", permute_qk=True),
    "smollm3": ArchSpec("smollm3", permute_qk=True, requires=NO_ATTENTION_BIAS + (("mlp_bias", False),)),
    "mixtral": ArchSpec("llama", permute_qk=True, norm_topk=True),
    "granitemoe": ArchSpec("granitemoe", permute_qk=True, norm_topk=True, rename=GRANITE_MOE_RENAME,
                           split_rows=GRANITE_MOE_SPLIT),
    "qwen2_moe": ArchSpec("qwen2moe", output_required=True, norm_topk=False, full_attention=True),
    "qwen3_moe": ArchSpec("qwen3moe", norm_topk=True, full_attention=True, requires=NO_ATTENTION_BIAS),
    "olmoe": ArchSpec("olmoe", output_required=True, norm_topk=False, requires=NO_ATTENTION_BIAS),
    "phi": ArchSpec("phi2", layer_norm=True, partial_rotary=True, output_required=True, acts=GELU_TANH,
                    requires=(("qk_layernorm", False),), full_attention=True),
    "starcoder2": ArchSpec("starcoder2", layer_norm=True, acts=GELU_TANH, requires=(("use_bias", True),),
                           full_attention=True),
    "stablelm": ArchSpec("stablelm", layer_norm=True, partial_rotary=True, output_required=True, acts=SILU,
                         requires=(("qk_layernorm", False),), full_attention=True),
    "cohere": ArchSpec("command-r", layer_norm=True, has_output=False, logit_scale=True, acts=SILU,
                       requires=(("attention_bias", False),), full_attention=True),
    "cohere2": ArchSpec("cohere2", layer_norm=True, has_output=False, logit_scale=True, acts=SILU,
                        requires=(("attention_bias", False),), swa_period=4),
    "olmo": ArchSpec("olmo", permute_qk=True, layer_norm=True, acts=SILU, requires=(("attention_bias", False),),
                     full_attention=True),
    "glm4": ArchSpec("glm4", partial_rotary=True, acts=SILU, full_attention=True),
    "ernie4_5": ArchSpec("ernie4_5", acts=SILU, requires=(("use_bias", False),), full_attention=True),
    # EXAONE 4: sliding layers (and RoPE-less full-attention ones) only as llama.cpp's exaone4 runs them at 64 layers
    "exaone4": ArchSpec("exaone4", acts=SILU, swa_period=4),
    "seed_oss": ArchSpec("seed_oss", acts=SILU, requires=(("attention_out_bias", False),), full_attention=True),
    "arcee": ArchSpec("arcee", permute_qk=True, acts=("relu2",), requires=(("attention_bias", False),
                                                                        ("mlp_bias", False)), full_attention=True),
    "gpt_neox": ArchSpec("gptneox", layer_norm=True, partial_rotary=True, output_required=True, acts=GELU_ANY,
                         fused_qkv=True, mha=True, requires=(("attention_bias", True),), full_attention=True),
    "gpt2": ArchSpec("gpt2", layer_norm=True, acts=GELU_TANH, act_key="activation_function", ff_key="n_inner",
                     rope=False, mha=True, transpose=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
                     requires=(("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("add_cross_attention", False)), full_attention=True),
    "falcon": ArchSpec("falcon", layer_norm=True, acts=GELU_ANY, act_key="activation", ff_key="ffn_hidden_size",
                       fused_qkv=True, requires=(("alibi", False), ("bias", False), ("parallel_attn", True)),
                       full_attention=True),
    "hunyuan_v1_dense": ArchSpec("hunyuan-dense", acts=SILU, requires=(("attention_bias", False),),
                                 full_attention=True),
    "apertus": ArchSpec("apertus", output_required=True, acts=("xielu",), full_attention=True,
                        requires=(("attention_bias", False),),
                        layer_scalars=tuple((f".mlp.act_fn.{p}", f"xielu_{p}") for p in ("alpha_n", "alpha_p", "beta",
                                                                                          "eps"))),
    "gpt_oss": ArchSpec("gpt-oss", norm_topk=True, output_required=True, gate_up_interleaved=True,
                        requires=(("attention_bias", True),)),
    "mpt": ArchSpec("mpt", layer_norm=True, ff_key="", rope=False, mha=True, full_attention=True),
    # Ministral (8B): Mistral whose layers may each have a sliding window; llama.cpp runs it as ``llama`` (full
    # attention), the same model exactly when no window is shorter than the trained context (checked)
    "ministral": ArchSpec("llama", permute_qk=True, acts=SILU),
    "deepseek_v2": ArchSpec("deepseek2", mla=True, acts=SILU, full_attention=True),
    "deepseek_v3": ArchSpec("deepseek2", mla=True, acts=SILU, full_attention=True, rename=gguf_deepseek.RENAME),
    # Hunyuan-A13B: Hunyuan's attention (Q/K norms after RoPE), softmax routing renormalized, a shared MLP
    # (its config field is moe_topk: transformers 4.x has no num_experts_per_tok alias)
    "hunyuan_v1_moe": ArchSpec("hunyuan-moe", norm_topk=True, acts=SILU, requires=(("attention_bias", False),),
                               full_attention=True, top_k_key="moe_topk"),
    # Llama 4 (text): sigmoid of the top-k router logits (not renormalized) scaling each expert's input, a shared
    # expert, interleaved pair RoPE (as llama.cpp's), weightless Q/K L2 norms, RoPE-less every 4th layer
    "llama4_text": ArchSpec("llama4", norm_topk=False, acts=SILU, ff_key="intermediate_size_mlp",
                            requires=(("attention_bias", False),)),
    # MiniCPM3: DeepSeek-V2-style latent attention run decompressed, NeoX RoPE on its RoPE part, MiniCPM's scales
    "minicpm3": ArchSpec("minicpm3", acts=SILU, full_attention=True, requires=(("attention_bias", False),)),
    # ERNIE 4.5 MoE: softmax routing, top-k chosen by probability plus a selection bias, renormalized; shared experts
    "ernie4_5_moe": ArchSpec("ernie4_5-moe", norm_topk=True, acts=SILU, requires=(("use_bias", False),),
                             full_attention=True, rename=((".mlp.gate.moe_statics.e_score_correction_bias",
                                                           ".mlp.moe_statics.e_score_correction.bias"),
                                                          (".mlp.moe_statics.e_score_correction_bias",  # 4.x
                                                           ".mlp.moe_statics.e_score_correction.bias"))),
    # GLM-4.5/4.6: DeepSeek-V3's routing with GQA attention (Q/K/V biases, optional per-head Q/K norms), partial
    # NeoX RoPE; its multi-token-prediction layers are not in transformers' model, so not in the file either
    "glm4_moe": ArchSpec("glm4moe", deepseek_moe=True, partial_rotary=True, acts=SILU, full_attention=True,
                         rename=gguf_deepseek.RENAME),
    # DBRX: LayerNorm without biases, fused Wqkv already all Q, all K, all V, NeoX RoPE, experts as 2-D stacks
    "dbrx": ArchSpec("dbrx", layer_norm=True, output_required=True, norm_topk=True, full_attention=True,
                     acts=SILU, act_key="ffn_config.ffn_act_fn.name", ff_key="ffn_config.ffn_hidden_size",
                     clip_key="attn_config.clip_qkv", experts_key="ffn_config.moe_num_experts",
                     top_k_key="ffn_config.moe_top_k", norm_topk_key="ffn_config.moe_normalize_expert_weights"),
    # Granite MoE with a shared expert whose fused ``input_linear`` (gate rows, then up) llama.cpp reads as two
    "granitemoeshared": ArchSpec("granitemoe", permute_qk=True, norm_topk=True, acts=SILU,
                                 rename=GRANITE_MOE_RENAME + ((".shared_mlp.output_linear.",
                                                               ".mlp.shared_expert.down_proj."),),
                                 split_rows=GRANITE_MOE_SPLIT + ((".shared_mlp.input_linear.weight",
                                                                  (".mlp.shared_expert.gate_proj.weight",
                                                                   ".mlp.shared_expert.up_proj.weight")),)),
    # StarCoder 1 / SantaCoder: multi-query fused ``c_attn`` (all queries, the key, the value), learned positions
    "gpt_bigcode": ArchSpec("starcoder", layer_norm=True, acts=GELU_TANH, act_key="activation_function",
                            ff_key="n_inner", rope=False, full_attention=True,
                            requires=(("multi_query", True), ("scale_attn_weights", True),
                                      ("add_cross_attention", False))),
    # Nemotron: LayerNorm1p (scales by ``1 + w``, with a bias), ReLU² MLP without gate, partial NeoX RoPE
    "nemotron": ArchSpec("nemotron", layer_norm=True, norm_shift=1.0, partial_rotary=True, acts=("relu2",),
                         requires=(("attention_bias", False), ("mlp_bias", False)), full_attention=True),
    "bloom": ArchSpec("bloom", layer_norm=True, ff_key="", fused_qkv=True, rope=False, mha=True,
                      rename=(("transformer.", ""),),
                      requires=(("apply_residual_connection_post_layernorm", False),), full_attention=True),
}
# Architectures llama.cpp has a name for but cannot load: a GGUF of them would not run there.
NOT_IN_LLAMA_CPP = {"gptj": "GPT-J"}

SUPPORTED = ("Llama, Mistral, Ministral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 (text), Phi-2, Phi-3, OLMo, OLMo 2, "
             "Granite, SmolLM3, StarCoder2, StableLM, Command-R, Cohere 2, GLM-4, ERNIE 4.5, EXAONE 4, Seed-OSS, "
             "Arcee, GPT-NeoX (Pythia), GPT-2, StarCoder 1 (gpt_bigcode), Falcon, BLOOM, MPT, Hunyuan (dense), "
             "Apertus, Nemotron, MiniCPM3, Qwen2-VL and Qwen2.5-VL (their language model) and the mixture-of-experts "
             "Mixtral, DBRX, Qwen2-MoE (Qwen1.5-MoE), "
             "Qwen3-MoE, OLMoE, Granite MoE (and with shared experts), gpt-oss, DeepSeek-V2, DeepSeek-V3, "
             "GLM-4.5 (glm4_moe), ERNIE 4.5 MoE, Hunyuan MoE and Llama 4 (text)")


def arch_spec(config) -> ArchSpec:
    """The spec of ``config.model_type``; a clear refusal for anything else."""
    model_type = getattr(config, "model_type", None)
    if model_type in NOT_IN_LLAMA_CPP:
        name = NOT_IN_LLAMA_CPP[model_type]
        raise UsageError(f"GGUF export does not write {name} ({model_type!r}) models: llama.cpp lists the "
                         f"architecture but has no implementation of it (its model loader refuses such a file, and "
                         f"its converter has no {name} class), so no GGUF of it runs in llama.cpp or Ollama. Use "
                         f"the merged checkpoint (qlora merge) with transformers, or qlora generate/serve.")
    if model_type not in SPECS:
        raise UsageError(f"GGUF export does not support the {model_type!r} architecture; it writes {SUPPORTED} models "
                         f"(with their llama.cpp conventions checked). For others use llama.cpp's "
                         f"convert_hf_to_gguf.py on the merged checkpoint (qlora merge).")
    return SPECS[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config, spec: ArchSpec) -> int:
    """Key/value heads as the model computes them (Falcon, StarCoder: one for multi-query; Falcon 40B: its groups)."""
    if spec.mha:
        return config.num_attention_heads
    if spec.gguf_arch == "falcon" and config.new_decoder_architecture:
        return config.num_kv_heads
    if spec.gguf_arch in ("falcon", "starcoder"):  # what the attention computes, whatever num_key_value_heads says
        return 1 if config.multi_query else config.num_attention_heads
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _context_length(config) -> int:
    """The trained context; BLOOM's config has none (ALiBi) and was trained on 2048 tokens."""
    return (getattr(config, "max_position_embeddings", None) or getattr(config, "seq_length", None)
            or getattr(config, "max_seq_len", None) or 2048)


def _feed_forward_length(config, spec: ArchSpec) -> int:
    return (config_value(config, spec.ff_key) if spec.ff_key else None) or 4 * config.hidden_size


def config_value(config, path: str, default=None):
    """A config field by dotted path through sub-configs and dicts (DBRX's ``ffn_config.ffn_act_fn.name``);
    ``default`` where the path does not exist (a field set to None is None)."""
    value = config
    for part in path.split("."):
        if value is None or not (part in value if isinstance(value, dict) else hasattr(value, part)):
            return default
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def rope_parameters(config) -> tuple[dict, dict | None]:
    """``(full-attention RoPE parameters, sliding-attention ones or None)`` across transformers versions."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        if getattr(config, "rope_local_base_freq", None) is not None:
            return params, {"rope_theta": config.rope_local_base_freq}
    if "full_attention" in params:
        return params["full_attention"], params.get("sliding_attention")
    return params, None


def write_metadata(writer, config, spec: ArchSpec, n_vocab: int) -> list[tuple[str, torch.Tensor]]:
    """Write the architecture's hyper-parameters; return extra tensors llama.cpp needs (RoPE factors)."""
    import gguf

    n_head, n_kv = config.num_attention_heads, kv_heads(config, spec)
    hd = head_dim(config)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(_feed_forward_length(config, spec))
    writer.add_head_count(n_head)
    if spec.mla:
        hd = gguf_deepseek.write_attention(writer, config)  # the RoPE width; MLA's sizes are its own
    elif spec.gguf_arch == "minicpm3":
        hd = _write_minicpm3_attention(writer, config)
    else:
        writer.add_head_count_kv(n_kv)
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    if spec.layer_norm:  # OLMo's weightless LayerNorm has a fixed eps and no config field
        writer.add_layer_norm_eps(next((v for v in (getattr(config, k, None) for k in (
            "layer_norm_eps", "layer_norm_epsilon", "norm_eps")) if v is not None), 1e-5))
    else:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    _check_graph_computes(config, spec)
    if spec.norm_topk is not None:
        _write_experts(writer, config, spec)
    if spec.mla or spec.deepseek_moe:
        gguf_deepseek.write_experts(writer, config, spec.gguf_arch)
    if spec.gguf_arch in ("qwen2moe", "olmoe", "olmo2") and (hd * n_head != config.hidden_size or (
            spec.gguf_arch == "olmoe" and n_kv != n_head)):  # llama.cpp sizes these by the hidden width
        raise UsageError(f"llama.cpp's {spec.gguf_arch} needs query heads spanning the hidden size"
                         f"{' and as many key/value heads as query heads' if spec.gguf_arch == 'olmoe' else ''}; "
                         f"this config has {n_head} heads of {hd} ({n_kv} key/value heads) for hidden size "
                         f"{config.hidden_size}. Refusing to export.")
    if spec.gguf_arch == "gptneox":
        writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    if spec.gguf_arch == "mpt":
        _write_mpt_attention(writer, config, hd)
    if config.model_type == "ministral":
        _check_ministral_windows(config)
    elif spec.gguf_arch in ("llama", "phi3") and 0 < (getattr(config, "sliding_window", None) or 0) < _context_length(
            config):  # llama.cpp's phi3 reads the window but turns it off
        log.warning("this %s config attends through a %d-token sliding window; llama.cpp runs it as %s with full "
                    "attention (as its own converter writes it), so the GGUF answers the same up to %d tokens of "
                    "context and differently past that.", config.model_type, config.sliding_window, spec.gguf_arch,
                    config.sliding_window)
    if not spec.rope:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return []
    full, sliding = rope_parameters(config)
    writer.add_rope_freq_base(_rope_base(full, spec, hd))
    if sliding is not None and "rope_theta" in sliding:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
    extra: list[tuple[str, torch.Tensor]] = []

    rotary = hd
    factor = full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    if spec.partial_rotary:
        rotary = int(factor * hd)
    elif factor != 1.0 and spec.gguf_arch != "phi3":
        raise UsageError(f"this {config.model_type} config rotates {factor:g} of each head (partial_rotary_factor), "
                         f"but llama.cpp's {spec.gguf_arch} rotates whole heads. Refusing to export.")
    if spec.gguf_arch == "phi3":
        rotary = int(full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
                     * config.hidden_size) // n_head
        original = full.get("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", config.max_position_embeddings))
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    writer.add_rope_dimension_count(rotary)
    extra += _rope_scaling(writer, config, spec, full, rotary)
    if spec.gguf_arch == "qwen2vl":  # M-RoPE: time, height, width sections of the rotated pairs (text: all equal)
        sections = list(full.get("mrope_section") or [])
        if len(sections) != 3 or sum(sections) != rotary // 2 or full.get("mrope_interleaved"):
            raise UsageError(f"this {config.model_type} config's mrope_section is {sections or 'missing'}; llama.cpp's "
                             f"qwen2vl M-RoPE takes three contiguous sections (time, height, width) of the "
                             f"{rotary // 2} rotated pairs. Refusing to export.")
        writer.add_rope_dimension_sections([*sections, 0])

    if spec.gguf_arch in ("granite", "granitemoe"):  # Granite's multipliers, as llama.cpp's granite graph applies them
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_logit_scale(config.logits_scaling)
    if spec.logit_scale:
        writer.add_logit_scale(config.logit_scale)
    clip = config_value(config, spec.clip_key)
    if clip or spec.gguf_arch == "dbrx":  # OLMo, DBRX clamp Q, K and V, as llama.cpp's shared attention input does
        writer.add_clamp_kqv(float(clip or 0.0))  # 0: no clamp (llama.cpp's dbrx requires the key)
    if spec.gguf_arch == "smollm3":
        _check_smollm3_nope_layers(config)
    if spec.gguf_arch == "gpt-oss":
        _check_gpt_oss(config)
        writer.add_sliding_window(config.sliding_window)
    if spec.gguf_arch in ("gemma2", "gemma3"):
        _check_gemma_attention_scale(config, spec, hd)
    if spec.gguf_arch == "exaone4":
        _write_exaone4_windows(writer, config, spec)
    elif spec.gguf_arch in ("gemma2", "gemma3", "cohere2"):
        _check_swa_layout(config, spec)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        layer_types = getattr(config, "layer_types", None)
        if layer_types:  # the per-layer pattern (llama.cpp's own, checked above) for readers that take it from here
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        _check_softcaps(config, spec)
        if spec.softcap:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    elif getattr(config, "use_sliding_window", False) or (spec.full_attention and _sliding_layers(config)):
        raise UsageError("this model uses sliding-window attention on some layers, which llama.cpp does not run "
                         "for its architecture; the exported model would attend differently. Refusing to export.")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return extra


def _check_graph_computes(config, spec: ArchSpec) -> None:
    """Refuse a config whose switches or activation llama.cpp's graph for ``spec`` does not compute."""
    act = config_value(config, spec.act_key)
    if spec.acts and act not in spec.acts:
        raise UsageError(f"this {config.model_type} config uses the {act!r} activation, but llama.cpp's "
                         f"{spec.gguf_arch} computes {spec.acts[0]!r}; the GGUF would compute different outputs. "
                         f"Refusing to export.")
    for key, expected in spec.requires:
        value = getattr(config, key, expected)
        if value is not None and bool(value) != expected:
            raise UsageError(f"this {config.model_type} config has {key}={value!r}, which llama.cpp's "
                             f"{spec.gguf_arch} does not compute (it needs {key}={expected}); the GGUF would not "
                             f"load or would compute differently. Refusing to export.")
    qk_norm = bool(getattr(config, "use_qk_norm", False))
    if spec.gguf_arch == "command-r" and qk_norm != (config.num_hidden_layers >= 64):
        raise UsageError(f"this Command-R config has use_qk_norm={qk_norm} with "
                         f"{config.num_hidden_layers} layers, but llama.cpp's command-r has Q/K norms exactly when a "
                         f"model has 64 or more layers. Refusing to export.")


def _write_experts(writer, config, spec: ArchSpec) -> None:
    """Expert counts and sizes; refuse routing llama.cpp's graph for ``spec`` does not compute."""
    n_expert = (config_value(config, spec.experts_key) if spec.experts_key else
                getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None))
    writer.add_expert_count(n_expert)
    top_k = config_value(config, spec.top_k_key)
    if isinstance(top_k, (list, tuple)):  # Hunyuan's per-layer list (moe_topk)
        if len(set(top_k)) != 1:
            raise UsageError(f"this {config.model_type} config routes each token to {list(top_k)} experts per layer "
                             f"({spec.top_k_key}), but llama.cpp's {spec.gguf_arch} uses one count for every layer. "
                             f"Refusing to export.")
        top_k = top_k[0]
    writer.add_expert_used_count(top_k)
    ff_expert = getattr(config, "moe_intermediate_size", None) or (
        config.intermediate_size if spec.gguf_arch in ("gpt-oss", "hunyuan-moe", "llama4") else None)
    if ff_expert:
        writer.add_expert_feed_forward_length(ff_expert)
    shared = (getattr(config, "shared_expert_intermediate_size", None)  # Qwen2-MoE
              or getattr(config, "shared_intermediate_size", None)  # Granite MoE (shared)
              or (config.intermediate_size if spec.gguf_arch == "hunyuan-moe" else None))  # Hunyuan's is its MLP
    if shared:
        writer.add_expert_shared_feed_forward_length(shared)
    norm = config_value(config, spec.norm_topk_key, spec.norm_topk)  # Mixtral always renormalizes, has no flag
    if norm is not None and not isinstance(norm, bool) and norm != 1:  # DBRX's p-norm; llama.cpp's is the sum
        raise UsageError(f"this {config.model_type} config renormalizes the top-k routing weights by their "
                         f"{norm}-norm ({spec.norm_topk_key}), but llama.cpp's {spec.gguf_arch} divides them by their "
                         f"sum (the 1-norm); the GGUF would mix experts differently. Refusing to export.")
    if bool(norm) != spec.norm_topk:
        rule = "always renormalizes" if spec.norm_topk else "never renormalizes"
        raise UsageError(f"this {config.model_type} config has {spec.norm_topk_key.rpartition('.')[2]}={norm}, "
                         f"but llama.cpp's {spec.gguf_arch} {rule} the top-k routing weights; the GGUF would mix "
                         f"experts differently. Refusing to export.")
    if spec.gguf_arch == "ernie4_5-moe":
        _write_ernie_moe_layers(writer, config)
    if spec.gguf_arch == "llama4":
        _write_llama4_layers(writer, config)
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense = [i for i in range(config.num_hidden_layers)
             if i in (getattr(config, "mlp_only_layers", None) or []) or (i + 1) % step]
    if dense:
        raise UsageError(f"this {config.model_type} model has dense MLP layers ({dense[:8]}) between its expert "
                         f"layers (mlp_only_layers / decoder_sparse_step), which llama.cpp's {spec.gguf_arch} "
                         f"does not run. Refusing to export.")


# llama.cpp's minicpm3 hard-codes MiniCPM's embedding, residual and logit scales (src/models/minicpm3.cpp)
MINICPM3_FIXED = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256}


def _write_minicpm3_attention(writer, config) -> int:
    """MiniCPM3's latent attention sizes as llama.cpp's minicpm3 reads them (decompressed: a key and a value per
    head); returns the RoPE width. Refuse scales llama.cpp hard-codes otherwise, and no query compression (its loader
    requires ``q_lora_rank``)."""
    differs = [f"{key}={getattr(config, key)!r}" for key, value in MINICPM3_FIXED.items()
               if abs(float(getattr(config, key)) - value) > 1e-9]
    if not config.q_lora_rank:
        differs.append(f"q_lora_rank={config.q_lora_rank!r}")
    if differs:
        raise UsageError(f"this MiniCPM3 config has {', '.join(differs)}, but llama.cpp's minicpm3 hard-codes "
                         f"{MINICPM3_FIXED} and compressed queries; the GGUF would compute differently. Refusing to "
                         f"export.")
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_key_length(config.qk_nope_head_dim + config.qk_rope_head_dim)
    writer.add_value_length(config.v_head_dim)
    writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    return config.qk_rope_head_dim


# llama.cpp's llama4 hard-codes these (src/models/llama4.cpp): 8192-token attention chunks, the temperature tuning of
# its RoPE-less layers, and RoPE-less, full-attention layers every 4th
LLAMA4_FIXED = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1, "attn_temperature_tuning": True}


def _write_llama4_layers(writer, config) -> None:
    """Llama 4's expert layers (every ``interleave_moe_layer_step``-th); refuse attention llama.cpp's
    llama4 computes otherwise: the constants above, another RoPE-less or chunked layer pattern, Q/K norms other than
    on every model but the 128-expert one (llama.cpp decides by the expert count)."""
    layers, step = config.num_hidden_layers, config.interleave_moe_layer_step
    rope = [int((i + 1) % 4 != 0) for i in range(layers)]
    expected = {**LLAMA4_FIXED, "moe_layers": [i for i in range(layers) if (i + 1) % step == 0], "no_rope_layers": rope,
                "layer_types": ["chunked_attention" if r else "full_attention" for r in rope],
                "use_qk_norm": config.num_local_experts != 128}
    # a key the config lacks takes llama.cpp's value; a null chunk size is a setting (no chunks), not a lack
    differs = [f"{key}={getattr(config, key)!r}" for key, value in expected.items()
               if getattr(config, key, None) not in (None, value)
               or key == "attention_chunk_size" and getattr(config, key, value) is None]
    if differs:
        raise UsageError(f"this Llama 4 config has {', '.join(differs)}, which llama.cpp's llama4 does not compute (it "
                         f"fixes {LLAMA4_FIXED}, experts on every interleave_moe_layer_step-th layer, RoPE-less "
                         f"full-attention layers every 4th, Q/K norms unless there are 128 experts); the GGUF would "
                         f"compute differently. Refusing to export.")
    writer.add_interleave_moe_layer_step(step)


def _write_ernie_moe_layers(writer, config) -> None:
    """ERNIE 4.5's expert layers (every ``moe_layer_interval``-th from ``moe_layer_start_index`` to
    ``moe_layer_end_index``) and shared experts as llama.cpp's ernie4_5-moe reads them: it has no last expert
    layer, so one before the last layer is refused."""
    start, step, end = config.moe_layer_start_index, config.moe_layer_interval, config.moe_layer_end_index
    layers = config.num_hidden_layers
    if end < max((i for i in range(layers) if (i + 1) % step == 0), default=0):
        raise UsageError(f"this ERNIE 4.5 MoE config ends its expert layers at layer {end} (moe_layer_end_index) "
                         f"of {layers}, but llama.cpp's ernie4_5-moe runs experts on every "
                         f"{step}th layer from {start} to the last; the GGUF would compute differently. "
                         f"Refusing to export.")
    writer.add_leading_dense_block_count(start)
    writer.add_interleave_moe_layer_step(step)
    if config.moe_num_shared_experts:
        writer.add_expert_shared_count(config.moe_num_shared_experts)
        writer.add_expert_shared_feed_forward_length(config.moe_intermediate_size * config.moe_num_shared_experts)


# transformers' MPT builds its ALiBi slopes with maximum bias 8 whatever ``alibi_bias_max`` says
MPT_ALIBI_BIAS = 8.0


def _write_mpt_attention(writer, config, hd: int) -> None:
    """MPT's ALiBi bias and ``clip_qkv`` as llama.cpp's mpt reads them; refuse attention it computes otherwise
    (transformers' MPT scales by ``softmax_scale``, llama.cpp by 1/sqrt(head_dim); llama.cpp's slopes follow the
    written maximum bias, transformers' the fixed 8, so a config meaning another one is ambiguous)."""
    attn = config.attn_config
    differs = [f"{key}={getattr(attn, key)!r}" for key, ok in (
        ("alibi", attn.alibi), ("alibi_bias_max", attn.alibi_bias_max == MPT_ALIBI_BIAS),
        ("softmax_scale", attn.softmax_scale is None or abs(attn.softmax_scale - hd ** -0.5) < 1e-9),
        ("qk_ln", not attn.qk_ln), ("prefix_lm", not attn.prefix_lm),
        ("attn_type", attn.attn_type == "multihead_attention")) if not ok]
    if differs:
        raise UsageError(f"this MPT config's attn_config has {', '.join(differs)}, which llama.cpp's mpt (ALiBi with "
                         f"maximum bias 8, attention scaled by 1/sqrt(head_dim), one key/value head per query head, "
                         f"causal) and transformers' MPT do not both compute. Refusing to export.")
    writer.add_max_alibi_bias(MPT_ALIBI_BIAS)
    if attn.clip_qkv:
        writer.add_clamp_kqv(attn.clip_qkv)


def _check_ministral_windows(config) -> None:
    """llama.cpp runs Ministral as ``llama``, attending to the whole context on every layer; a sliding-window
    layer computes the same only if its window covers the trained context."""
    window = getattr(config, "sliding_window", None)
    context = _context_length(config)
    if _sliding_layers(config) and window is not None and window < context:
        raise UsageError(f"this Ministral config attends through a {window}-token sliding window on some layers "
                         f"(layer_types), shorter than its {context}-token context; llama.cpp runs Ministral as "
                         f"llama with full attention on every layer (its converter has no Ministral class), so the "
                         f"GGUF would attend differently past {window} tokens. Refusing to export.")


def _check_smollm3_nope_layers(config) -> None:
    """llama.cpp's smollm3 skips RoPE on every 4th layer (a fixed step, no GGUF key); SmolLM3's config lists the
    layers that use it (``no_rope_layers``, 1 = RoPE). Any other pattern would attend differently there."""
    layers = getattr(config, "no_rope_layers", None)
    expected = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
    if layers is not None and list(layers) != expected:
        raise UsageError(f"this SmolLM3 config uses RoPE on layers {list(layers)} (no_rope_layers), but llama.cpp's "
                         f"smollm3 skips it on every 4th layer ({expected}); the GGUF would attend differently. "
                         f"Refusing to export.")


# gpt-oss's clamped SwiGLU, as llama.cpp's graph hard-codes it: gate * sigmoid(ALPHA * gate) * (up + 1), the gate
# clamped above at LIMIT and the up projection to [-LIMIT, LIMIT]
GPT_OSS_SWIGLU = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def _check_gpt_oss(config) -> None:
    """llama.cpp's gpt-oss fixes the SwiGLU constants and runs sliding-window attention on every even layer
    (0, 2, ...) and full attention on the odd ones; a config that differs would compute differently there."""
    for key, value in GPT_OSS_SWIGLU.items():
        if abs(float(getattr(config, key, value)) - value) > 1e-6:  # older transformers hard-codes them too
            raise UsageError(f"this gpt-oss config has {key}={getattr(config, key)}, but llama.cpp's gpt-oss "
                             f"computes its SwiGLU with {key}={value}; the GGUF would compute different "
                             f"outputs. Refusing to export.")
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(config.num_hidden_layers)]
    if layer_types and layer_types != expected or not getattr(config, "sliding_window", None):
        raise UsageError(f"this gpt-oss config attends with layer_types={layer_types} and sliding_window="
                         f"{getattr(config, 'sliding_window', None)}, but llama.cpp's gpt-oss runs a sliding window "
                         f"on every even layer and full attention on the odd ones ({expected[:4]}...); the GGUF "
                         f"would attend differently. Refusing to export.")


def _check_softcaps(config, spec: ArchSpec) -> None:
    """llama.cpp's gemma2 soft-caps attention scores and final logits whatever the file says (its defaults where it
    has no value), its gemma3 and cohere2 never; transformers caps where the config gives a value."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(config, key, None)
        if (value is None) == spec.softcap:
            rule = "always soft-caps" if spec.softcap else "has no soft-capping of"
            raise UsageError(f"this {config.model_type} config has {key}={value}, but llama.cpp's {spec.gguf_arch} "
                             f"{rule} the attention scores and the final logits; the GGUF would compute different "
                             f"outputs. Refusing to export.")


def _fixed_swa_layers(layers: int, period: int) -> list[str]:
    """The layer types of llama.cpp's fixed sliding-window layout: every ``period``-th layer full attention."""
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]


def _check_swa_layout(config, spec: ArchSpec) -> None:
    """llama.cpp's gemma2, gemma3 and cohere2 place their sliding-window layers by a fixed period (its loaders take
    no per-layer pattern from the file); a config whose ``layer_types`` differ would attend differently there."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = _fixed_swa_layers(config.num_hidden_layers, spec.swa_period)
    if layer_types and layer_types != expected:
        period = spec.swa_period
        raise UsageError(f"this {config.model_type} config attends with layer_types={layer_types}, but llama.cpp's "
                         f"{spec.gguf_arch} runs full attention on layers {period - 1}, {2 * period - 1}, ... and a "
                         f"sliding window on the others ({expected[:period]}...), whatever the file says; the GGUF "
                         f"would attend differently. Refusing to export.")


# llama.cpp's exaone4 has sliding-window layers (every 4th full attention, without RoPE) at this depth only (32B)
EXAONE4_SWA_LAYERS = 64


def _write_exaone4_windows(writer, config, spec: ArchSpec) -> None:
    """EXAONE 4's attention as llama.cpp's exaone4 runs it. With a ``sliding_window``, transformers attends through
    it on the sliding layers and skips RoPE on the full-attention ones; without, every layer is full attention with
    RoPE. llama.cpp does the first at 64 layers (its fixed layout: every 4th layer full), the second at any other
    depth; a config computing otherwise is refused."""
    window = getattr(config, "sliding_window", None)
    layers = config.num_hidden_layers
    layer_types = list(getattr(config, "layer_types", None) or [])
    if layers == EXAONE4_SWA_LAYERS:
        expected = _fixed_swa_layers(layers, spec.swa_period)
        if window and layer_types == expected:
            writer.add_sliding_window(window)
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
            return
        raise UsageError(f"this {layers}-layer EXAONE 4 config has sliding_window={window} and layer_types="
                         f"{layer_types[:spec.swa_period]}..., but llama.cpp's exaone4 runs a {layers}-layer model "
                         f"with full attention without RoPE on layers {spec.swa_period - 1}, "
                         f"{2 * spec.swa_period - 1}, ... and a sliding window on the others "
                         f"({expected[:spec.swa_period]}...); the GGUF would attend differently. Refusing to export.")
    if window is not None:
        raise UsageError(f"this EXAONE 4 config has sliding_window={window}, with which transformers uses "
                         f"sliding-window attention on its sliding layers and no RoPE on its full-attention ones "
                         f"(layer_types={layer_types[:4]}...); llama.cpp's exaone4 does so only for 64 layers "
                         f"(EXAONE 4.0 32B) and runs this {layers}-layer model with full attention and RoPE on every "
                         f"layer, so the GGUF would attend differently. Refusing to export.")


def _sliding_layers(config) -> bool:
    return any(t == "sliding_attention" for t in getattr(config, "layer_types", None) or [])


def _check_gemma_attention_scale(config, spec: ArchSpec, hd: int) -> None:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is None:
        return
    is_27b = config.num_hidden_layers == spec.swa_27b_layers
    expected = config.hidden_size // config.num_attention_heads if is_27b else hd
    if scalar != expected:
        raise UsageError(f"this Gemma config has query_pre_attn_scalar={scalar}, but llama.cpp scales attention by "
                         f"1/sqrt({expected}) for a {config.num_hidden_layers}-layer model; the GGUF would compute "
                         f"different attention. Refusing to export.")


def _ntk_alpha(rope: dict, spec: ArchSpec) -> bool:
    """Hunyuan's "dynamic" RoPE with a fixed ``alpha``: a larger base, nothing dynamic about it."""
    kind = (rope.get("rope_type") or rope.get("type") or "").lower()
    return spec.gguf_arch in ("hunyuan-dense", "hunyuan-moe") and kind == "dynamic" and bool(rope.get("alpha"))


def _rope_base(rope: dict, spec: ArchSpec, hd: int) -> float:
    base = rope.get("rope_theta", 10000.0)
    return base * rope["alpha"] ** (hd / (hd - 2)) if _ntk_alpha(rope, spec) else base


def _yarn_attention_factor(rope: dict) -> float:
    """The factor transformers scales YaRN's cos/sin by: ``attention_factor`` when given, else from ``factor``
    (and ``mscale``/``mscale_all_dim`` where both are set)."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])

    def magnitude(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    factor, mscale, all_dim = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
    return magnitude(factor, mscale) / magnitude(factor, all_dim) if mscale and all_dim else magnitude(factor)


def _rope_scaling(writer, config, spec: ArchSpec, rope: dict, rotary: int) -> list[tuple[str, torch.Tensor]]:
    import gguf

    kind = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if kind == "default" or _ntk_alpha(rope, spec):
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
        return []
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
        if spec.mla:  # llama.cpp's deepseek2 reads mscale_all_dim (times 0.1, as its converter writes it)
            gguf_deepseek.check_yarn(config, rope, _yarn_attention_factor(rope))
            if rope.get("mscale_all_dim"):
                writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
            return []
        factor = _yarn_attention_factor(rope) / (1.0 + 0.1 * math.log(rope["factor"]))
        if abs(factor - 1.0) > 1e-7:
            writer.add_rope_scaling_attn_factors(factor)
        return []
    if kind in ("llama3", "llama4") and spec.gguf_arch in ("llama", "apertus", "llama4"):
        return [("rope_freqs.weight", _llama3_rope_factors(rope, rotary))]
    if kind in ("longrope", "su") and spec.gguf_arch in ("phi3", "minicpm3"):
        return _longrope(writer, config, rope, rotary, spec)
    raise UsageError(f"GGUF export does not write {kind!r} RoPE scaling for {config.model_type} models; "
                     f"the exported model would use different positions. Refusing to export.")


def _llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """Llama 3.1's per-frequency RoPE divisors, as llama.cpp reads them from ``rope_freqs``
    (transformers computes the same scaling on the fly)."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _longrope(writer, config, rope: dict, rotary: int, spec: ArchSpec) -> list[tuple[str, torch.Tensor]]:
    """LongRoPE (Phi-3, MiniCPM3): its two factor tables and attention factor. transformers switches to the long
    factors past ``original_max_position_embeddings`` tokens, llama.cpp for a context longer than the original
    context it reads (written for MiniCPM3 too; Phi-3's is written with its other RoPE metadata)."""
    import gguf

    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long or not short or len(long) != rotary // 2 or len(short) != rotary // 2:
        raise UsageError(f"{config.model_type} LongRoPE needs long_factor and short_factor of {rotary // 2} values "
                         f"each in the config's RoPE parameters.")
    original = rope.get("original_max_position_embeddings",
                        getattr(config, "original_max_position_embeddings", config.max_position_embeddings))
    scale = config.max_position_embeddings / original
    writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    if spec.gguf_arch != "phi3":
        writer.add_rope_scaling_orig_ctx_len(original)
    return [("rope_factors_long.weight", torch.tensor(long, dtype=torch.float32)),
            ("rope_factors_short.weight", torch.tensor(short, dtype=torch.float32))]


def tensor_namer(config, spec: ArchSpec) -> Callable[[str], str | None]:
    """HF state-dict key -> GGUF tensor name (None if gguf has no name for it)."""
    import gguf

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.gguf_arch)
    table = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def name(key: str) -> str | None:
        for old, new in spec.rename:
            key = key.replace(old, new)
        found = table.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is not None and not key.endswith((".weight", ".bias")):
            found += ".weight"  # transformers' bare 3-D expert parameters (``mlp.experts.down_proj``)
        return found
    return name


def llama_cpp_shape(key: str, shape: tuple[int, ...], spec: ArchSpec) -> tuple[int, ...]:
    """The shape :func:`to_llama_cpp` gives the tensor of ``key``."""
    return tuple(reversed(shape)) if key.endswith(spec.transpose) else tuple(shape)


def to_llama_cpp(key: str, tensor: torch.Tensor, config, spec: ArchSpec) -> torch.Tensor:
    """Apply llama.cpp's layout convention to one HF tensor (see module docstring)."""
    if spec.transpose and key.endswith(spec.transpose):
        tensor = tensor.t().contiguous()
    if spec.fused_qkv and key.endswith(("query_key_value.weight", "query_key_value.bias")):
        tensor = _ungroup_qkv(tensor, config, spec)
    if spec.permute_qk and (key.endswith("self_attn.q_proj.weight") or key.endswith("self_attn.q_proj.bias")
                            or key.endswith("self_attn.k_proj.weight") or key.endswith("self_attn.k_proj.bias")):
        heads = config.num_attention_heads if ".q_proj." in key else (
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        rest = tensor.shape[1:]
        tensor = tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *rest).transpose(1, 2).reshape(-1, *rest)
    if spec.norm_shift and key.endswith("norm.weight"):
        tensor = tensor.float() + spec.norm_shift
    if spec.mla:
        tensor = gguf_deepseek.to_interleaved_rope(key, tensor, config)
    return tensor


def _ungroup_qkv(tensor: torch.Tensor, config, spec: ArchSpec) -> torch.Tensor:
    """HF's fused QKV rows, grouped per key/value head (each group: its query heads, then one key and one value
    head; GPT-NeoX and BLOOM: one query head per group), as llama.cpp's all queries, all keys, all values."""
    n_kv, hd = kv_heads(config, spec), head_dim(config)
    rest = tensor.shape[1:]
    groups = tensor.reshape(n_kv, -1, hd, *rest)
    q, k, v = groups[:, :-2], groups[:, -2], groups[:, -1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]).contiguous()
