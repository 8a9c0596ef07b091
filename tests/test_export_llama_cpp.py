"""llama.cpp itself runs the exported GGUF (slow; needs llama-cpp-python).

llama-cpp-python builds llama.cpp from source on install (``pip install llama-cpp-python``,
several minutes on 2 cores). Without it this module is skipped; it is run before a release
and before changes to the GGUF export are accepted:

    pip install llama-cpp-python
    python -m pytest tests/test_export_llama_cpp.py

The model is a tiny Llama QLoRA-trained briefly on qlora's demo data (as ``qlora demo``
does), so its greedy choices have clear margins: a random tiny model has near-ties that
any two correct implementations may break differently.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.mpt.configuration_mpt import MptAttentionConfig

import qlora
from qlora.cli.main import main
from qlora.infer.generate import SamplingOptions, encode_prompt, stream_tokens
from qlora.model.merge import merge
from qlora.model.tiny import build_tiny_model, train_tokenizer
from random_adapters import add_random_moe_lora

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base dir, adapter dir, {type: gguf path}) for a briefly QLoRA-trained tiny Llama."""
    from qlora.train.config import TrainConfig
    from qlora.train.data import demo_data_path
    from qlora.train.trainer import Trainer

    root = tmp_path_factory.mktemp("llama-cpp")
    records = [json.loads(line) for line in demo_data_path().read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer([f"{r['instruction']} {r['output']}" for r in records] * 4, vocab_size=512)
    base = build_tiny_model(root / "base", tokenizer=tokenizer, arch="llama", hidden=128, layers=2, heads=4,
                            kv_heads=2, intermediate=256, seed=0, initializer_range=0.1)
    config = TrainConfig(model=str(base), data=str(demo_data_path()), output=str(root / "adapter"), overwrite=True,
                         rank=32, alpha=64, dropout=0.0, lr=3e-3, lr_scheduler="cosine", warmup_steps=5,
                         max_steps=200, batch_size=8, optim="adamw", max_grad_norm=1.0, seq_len=64,
                         logging_steps=50, progress=False, seed=0)
    Trainer(config).run()
    files = {}
    for out_type in ("f16", "q8_0"):
        assert main(["export", "--model", str(base), "--adapter", str(root / "adapter"),
                     "--output", str(root / out_type), "--type", out_type]) == 0
        files[out_type] = root / out_type / f"model-{out_type}.gguf"
    return base, root / "adapter", files


@torch.no_grad()
def _qlora_greedy(base, adapter, n: int) -> tuple[str, list[int], list[int]]:
    """(chat prompt, its ids, n greedy tokens) from qlora's generation on the merged model."""
    model, tokenizer = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, adapter)
    merge(model, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = encode_prompt(model, tokenizer, prompt)
    out = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=n, temperature=0.0), stop_ids=()))
    return prompt, ids[0].tolist(), out


@pytest.mark.parametrize("out_type,n", [("f16", 32), ("q8_0", 8)])
def test_llama_cpp_greedy_tokens_match_qlora_generate(exported, out_type, n):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    base, adapter, files = exported
    prompt, prompt_ids, expected = _qlora_greedy(base, adapter, n)
    llm = llama_cpp.Llama(model_path=str(files[out_type]), n_ctx=256, n_threads=2, verbose=False, seed=0)

    # llama.cpp applies the chat template embedded in the file
    template = llm.metadata["tokenizer.chat_template"]
    eos, bos = (llm._model.token_get_text(i) for i in (llm.token_eos(), llm.token_bos()))
    rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(
        messages=[{"role": "user", "content": QUESTION}])
    assert rendered.prompt == prompt
    ids = llm.tokenize(rendered.prompt.encode(), add_bos=True, special=True)
    assert ids == prompt_ids  # same tokenizer: BPE merges, pre-tokenizer, specials, BOS

    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == n:
            break
    assert got == expected


def test_llama_cpp_chat_completion_answers_as_qlora_does(exported):
    base, adapter, files = exported
    _, _, expected = _qlora_greedy(base, adapter, 32)
    tokenizer = qlora.load_model(base, quant=None, device="cpu")[1]
    ends = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    stop = next((i for i, t in enumerate(expected) if t in ends), len(expected))
    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=256, n_threads=2, verbose=False, seed=0)
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=32)
    text = reply["choices"][0]["message"]["content"]
    assert text.strip() == tokenizer.decode(expected[:stop], skip_special_tokens=True).strip()
    assert "Paris" in text  # the trained adapter is in the file


def test_bos_where_qlora_generate_puts_one_chat_and_raw(exported):
    """The tiny tokenizer adds BOS and its ChatML template writes none. ``qlora generate`` gives a chat prompt the
    template's ids alone (as training tokenized the conversations) and raw text the tokenizer's BOS. The GGUF
    keeps the tokenizer's ``add_bos_token``: llama.cpp's raw completion starts with BOS, and llama-cpp-python's
    chat path, which adds none to a rendered template, gives exactly the chat ids. (llama.cpp's own server and CLI
    and Ollama add BOS to chat prompts too when the file says so: see docs/gguf.md.)"""
    base, _, files = exported
    model, tokenizer = qlora.load_model(base, quant=None, device="cpu")
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = encode_prompt(model, tokenizer, prompt, chat=True)[0].tolist()
    raw = encode_prompt(model, tokenizer, QUESTION)[0].tolist()
    assert raw[0] == tokenizer.bos_token_id != chat[0]

    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=256, n_threads=2, verbose=False, seed=0)
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    llm.create_chat_completion(messages, temperature=0.0, max_tokens=1)
    assert llm.input_ids[: len(chat)].tolist() == chat
    llm.reset()
    llm.create_completion(QUESTION, temperature=0.0, max_tokens=1)
    assert llm.input_ids[: len(raw)].tolist() == raw


# Every exported architecture, run by llama.cpp: its logits for a prompt equal the merged model's. This checks
# the conventions transformers' reader would undo for us (RoPE layout, Gemma norms, fused Phi-3 projections,
# soft-capping, sliding-window pattern) against the real consumer.
ARCHS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "phi3": {}, "qwen3": {},
    "gemma2": dict(head_dim=256, tie_word_embeddings=True),
    "gemma3": dict(head_dim=256, tie_word_embeddings=True),
    "llama-rope-llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
    # YaRN whose cos/sin scale is not llama.cpp's own 0.1 ln(factor) + 1: given outright, or from mscale ratios
    "qwen2-yarn-attention-factor": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "attention_factor": 1.3}),
    "qwen2-yarn-mscale": dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.5, "mscale_all_dim": 2.0}),
}


def _random_lora(model) -> None:
    """All-linear LoRA with nonzero B, so folding it in changes every matrix."""
    from qlora.nn import LoraLinear

    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_logits_equal_the_merged_model(tmp_path, tiny_tokenizer, arch):
    from qlora.model.gguf_export import export_gguf
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch=arch.split("-")[0],
                                 initializer_range=0.1, **ARCHS[arch])
    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    _random_lora(model)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Question: what is two plus two?")["input_ids"]
    expected = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]

    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, logits_all=True,
                          verbose=False)
    assert llm.tokenize(tokenizer.decode(ids[1:]).encode(), add_bos=True) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-3


@torch.no_grad()
def test_k_quants_are_llama_cpps_own_and_lose_accuracy_in_order_of_their_bits(tmp_path, tiny_tokenizer):
    """--type q4_k_m runs llama.cpp's quantizer: its Q4_K/Q6_K mix, and error shrinking with more bits."""
    from qlora.model.gguf_export import export_gguf
    from qlora.model.gguf_quantize import quantize_gguf

    gguf = pytest.importorskip("gguf")
    # rows of 256 values: the k-quant block size (narrower rows get llama.cpp's fallback types)
    base = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama", hidden=256, layers=2, heads=4,
                            kv_heads=2, intermediate=512, seed=0, initializer_range=0.05)
    adapter = tmp_path / "adapter"
    model, tokenizer = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    _random_lora(model)
    qlora.save_adapter(model, adapter)
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"),
                 "--type", "q4_k_m"]) == 0
    q4 = tmp_path / "out" / "model-q4_k_m.gguf"
    assert sorted(p.name for p in q4.parent.iterdir()) == [".qlora-output.json", "Modelfile", q4.name]
    reader = gguf.GGUFReader(q4)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and "Q6_K" in types.values()  # llama.cpp's Q4_K_M mix
    assert types["blk.0.attn_norm.weight"] == "F32"

    ids = tokenizer("The quick brown fox jumps over the lazy dog. Question: what is two plus two?")["input_ids"]
    expected = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")  # the merged model; quantize from it directly
    errors = {}
    for out_type in ("q6_k", "q4_k_m", "q2_k"):
        path = q4 if out_type == "q4_k_m" else quantize_gguf(tmp_path / "f16.gguf", tmp_path / f"{out_type}.gguf",
                                                             out_type)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)])
        llm.close()
        errors[out_type] = float((got - expected).abs().max() / expected.abs().max())
        if out_type == "q4_k_m":  # the CLI's file is the adapter folded into the nf4 base, as merge gives
            assert float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min()) > 0.9, errors
    assert errors["q6_k"] < errors["q4_k_m"] < errors["q2_k"], errors


# Mixture-of-experts exports, run by llama.cpp. Each tiny MoE (tests/tiny_moe.py: 2 layers, 4 experts, top-2)
# carries a random LoRA adapter on every attention/shared-expert linear layer *and* on the 3-D expert weights
# (PEFT's target_parameters), so the file is right only if both kinds are folded into the dequantized 4-bit base.
# The configs are the ones llama.cpp's graphs compute: Qwen3-MoE renormalizes its top-k weights (as the released
# checkpoints do), OLMoE uses as many key/value heads as query heads, the Qwen2-MoE one ties its embedding
# (llama.cpp's qwen2moe still needs an output matrix), Granite MoE has all four of Granite's multipliers.
# gpt-oss as released: YaRN over 4096 trained positions, rope_theta 150000; a 4-token window on the even layers
GPT_OSS_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
# llama.cpp always rounds YaRN's correction range to whole dimensions (transformers' truncate=True); the released
# configs say truncate=False, which no GGUF can express (see docs/gguf.md), so the exact check rounds as llama.cpp does
GPT_OSS = dict(head_dim=16, sliding_window=4, max_position_embeddings=131072,
               rope_parameters={**GPT_OSS_YARN, "truncate": True})
MOE = {
    "mixtral": {},
    # sinks, biased experts with alternating gate/up rows, clamped SwiGLU, router bias, sliding window, YaRN
    "gpt_oss": GPT_OSS,
    "qwen2_moe": dict(tie_word_embeddings=True),
    "qwen3_moe": dict(norm_topk_prob=True, head_dim=16),  # heads x head_dim != hidden, as in Qwen3-30B-A3B
    "olmoe": dict(num_key_value_heads=4),
    "granitemoe": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=4.0),
    "mixtral-16bit": {},  # adapters on transformers' own (not quantized) experts module
    # multi-head latent attention with kv_b split into k_b/v_b, a leading dense layer, shared experts. V2-Lite as
    # released: no query compression, softmax routing scaled without renormalizing, YaRN with mscale = mscale_all_dim
    "deepseek_v2": dict(q_lora_rank=None, routed_scaling_factor=2.0, max_position_embeddings=128,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 32, "mscale": 0.707,
                                         "mscale_all_dim": 0.707}),
    # V3: sigmoid scores with a selection bias (random, see _biased_routing), top-1 of 2 groups, renormalized
    "deepseek_v3": dict(n_group=2, topk_group=1),
    "deepseek_v3-rotate-half": dict(rope_interleave=False),  # RoPE rows reordered to llama.cpp's pairs
    # V3's routing (selection bias, top-1 of 2 groups, scaled) with GQA: Q/K/V biases, per-head Q/K norms, partial
    # NeoX RoPE, a leading dense layer, a shared expert
    "glm4_moe": dict(use_qk_norm=True, attention_bias=True, n_group=2, topk_group=1, routed_scaling_factor=2.0),
    # softmax routing with a selection bias, renormalized; two shared experts; a leading dense layer
    "ernie4_5_moe": dict(head_dim=8),
    # dense Hunyuan's attention (Q/K norms after RoPE, "dynamic" RoPE with a fixed alpha), a shared MLP
    "hunyuan_v1_moe": dict(head_dim=8, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                                                        "factor": 1.0}),
    # experts on every 2nd layer (dense ones intermediate_size_mlp wide), sigmoid-scaled expert inputs, a shared
    # expert, L2 Q/K norms, a RoPE-less 4th layer with temperature tuning, Llama 3.1 RoPE scaling. (llama.cpp's
    # llama4 fails an assertion on a model without a full-attention layer, so 4 layers, as every real one has.)
    "llama4_text": dict(attention_chunk_size=8192, num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                        interleave_moe_layer_step=2, moe_layers=[1, 3],
                        layer_types=["chunked_attention"] * 3 + ["full_attention"],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
    # Granite MoE's multipliers plus a shared expert whose fused input_linear llama.cpp reads as gate and up
    "granitemoeshared": dict(shared_intermediate_size=32, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=4.0),
}
MOE_PROMPT = "The quick brown fox jumps over the lazy dog. Question: what is two plus two?"


def _adapted_moe(model_dir, quant: str | None = "nf4"):
    """A tiny MoE (4-bit by default) with random non-zero LoRA on its linear layers and its expert weights."""
    model, tokenizer = qlora.load_model(model_dir, quant=quant, compute_dtype=torch.float32, device="cpu")
    add_random_moe_lora(model)
    return model.eval(), tokenizer


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens of ``model`` after ``ids`` and the smallest lead of the chosen logit over the runner-up,
    relative to the largest logit (how much error the comparison tolerates before a tie could flip)."""
    seq, margin = list(ids), float("inf")
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top = logits.topk(2).values
        margin = min(margin, float((top[0] - top[1]) / logits.abs().max()))
        seq.append(int(logits.argmax()))
    return seq[len(ids):], margin


def _llama_cpp(path, f32_cache: bool = True, n_ctx: int = 128):
    # llama.cpp keeps its KV cache in f16 by default; f32 makes an f32 file's logits comparable at 1e-5
    kw = dict(type_k=0, type_v=0) if f32_cache else {}  # 0 = GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, **kw)


def _llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == n:
            return got
    return got


@torch.no_grad()
@pytest.mark.parametrize("model_type", list(MOE))
def test_llama_cpp_runs_moe_exports_as_the_merged_model(tmp_path, tiny_tokenizer, model_type):
    from qlora.model.gguf_export import export_gguf
    from tiny_moe import save_tiny_moe

    quant = None if model_type.endswith("-16bit") else "nf4"
    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, model_type.split("-")[0], **MOE[model_type])
    _biased_routing(model_dir)
    model, tokenizer = _adapted_moe(model_dir, quant)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    ids = tokenizer(MOE_PROMPT)["input_ids"]
    base = qlora.load_model(model_dir, quant=quant, compute_dtype=torch.float32, device="cpu")[0]
    base = base(torch.tensor([ids])).logits[0]
    merged = merge(model, dtype=torch.float32)
    expected = merged(torch.tensor([ids])).logits[0]
    assert _relative(base, expected) > 0.05  # the adapters matter: a file without them fails by far

    llm = _llama_cpp(tmp_path / "m.gguf")
    assert llm.metadata[f"{llm.metadata['general.architecture']}.expert_count"] == "4"
    llm.eval(ids)
    error = _relative(torch.tensor(llm.scores[: len(ids)]), expected)
    assert error < 1e-5  # measured ~1e-6
    tokens, margin = _greedy(merged, ids, 16)
    assert margin > 2 * error  # no near-tie that this much error could flip: equal tokens are a real check
    assert _llama_cpp_greedy(llm, ids, 16) == tokens


def _biased_routing(model_dir) -> None:
    """DeepSeek-V3's expert selection bias (a buffer, so zero in a fresh model) set to random values that change
    which experts are picked."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    state = load_file(path)
    g = torch.Generator().manual_seed(0)
    biases = [k for k in state if k.endswith("e_score_correction_bias")]
    for key in biases:
        state[key] = 0.3 * torch.randn(state[key].shape, generator=g)
    if biases:
        save_file(state, path, metadata={"format": "pt"})


# Dense architectures written by the same path, each in a config that exercises what llama.cpp must be told:
# Granite's four multipliers, SmolLM3's RoPE-less 4th layer, OLMo 2's post-norms, full-width Q/K norms and
# tied head written twice, Gemma's norm + 1 and tied head, and what the comments below name. (tests/tiny_moe.py
# builds a tiny checkpoint of any model type.)
DENSE = {
    "gemma": {},
    "olmo2": dict(tie_word_embeddings=True),  # llama.cpp's olmo2 still needs an output matrix
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    "smollm3": dict(num_hidden_layers=4, layer_types=["full_attention"] * 4, no_rope_layers=[1, 1, 1, 0]),
    # LayerNorm with biases, parallel attention/MLP, partial NeoX RoPE, output bias, tied head written twice
    "phi": dict(tie_word_embeddings=True),
    "starcoder2": {},  # LayerNorm with biases, biased GELU MLP
    "stablelm": dict(use_qkv_bias=True),  # partial rotary (1/4 of each head), Q/K/V biases
    "stablelm-parallel": dict(use_parallel_residual=True),  # no post-attention norm: MLP reads the input norm
    "cohere": dict(logit_scale=0.5),  # weight-only LayerNorm, parallel blocks, interleaved RoPE, logit scale
    "cohere2": dict(num_hidden_layers=4, sliding_window=4, layer_types=["sliding_attention"] * 3 + ["full_attention"],
                    logit_scale=0.5),  # RoPE only on sliding layers, a window shorter than the prompt
    "olmo": dict(clip_qkv=0.8),  # weightless LayerNorm, Llama's Q/K reorder, Q/K/V clamped
    "glm4": dict(head_dim=16),  # fused gate/up, post-norms, interleaved RoPE on half of each head, Q/K/V biases
    "ernie4_5": dict(head_dim=8),
    "exaone4": dict(sliding_window=None, layer_types=["full_attention"] * 2),  # post-norms only, Q/K norms
    "seed_oss": dict(head_dim=8, attention_bias=True),
    "arcee": {},  # ReLU² MLP without gate, Llama's Q/K reorder
    # fused QKV regrouped, partial NeoX RoPE, parallel residual, exact GELU, untied head
    "gpt_neox": {},
    "gpt_neox-sequential": dict(use_parallel_residual=False, tie_word_embeddings=True),  # tied head written twice
    "gpt2": dict(tie_word_embeddings=False),  # Conv1D weights transposed, learned positions, untied head
    "falcon": {},  # multi-query (Falcon 7B), parallel attention/MLP from one norm
    "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2),  # grouped QKV, separate attention norm
    "falcon-rw": dict(multi_query=False, tie_word_embeddings=False),  # per-head QKV, untied head
    "bloom": {},  # ALiBi, embedding LayerNorm, per-head QKV
    # ALiBi slopes of 12 heads (not a power of two: the interleaved second series), Q/K/V clamped, tied head
    "mpt": dict(hidden_size=48, num_attention_heads=12, attn_config=MptAttentionConfig(clip_qkv=0.5)),
    # Ministral run as llama: its sliding window spans the whole 64-token context, so full attention is the same
    "ministral": dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    # Q/K RMSNorm after NeoX RoPE; "dynamic" RoPE with a fixed alpha, a larger base
    "hunyuan_v1_dense": dict(head_dim=8, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                          "alpha": 1000.0, "factor": 1.0}),
    "gpt_bigcode": dict(tie_word_embeddings=False),  # multi-query fused QKV, learned positions, GELU (StarCoder 1)
    "nemotron": {},  # LayerNorm1p (w + 1, with biases), ReLU² without gate, NeoX RoPE on half of each head
    # latent attention run decompressed, MiniCPM's fixed scales; LongRoPE past its 16-token original context: the
    # long factors and attention factor in both (transformers by the prompt's length, llama.cpp by the context's)
    "minicpm3": dict(num_key_value_heads=4, max_position_embeddings=128, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0, 1.5, 2.0, 4.0],
        "short_factor": [1.0, 1.2, 1.5, 3.0], "original_max_position_embeddings": 16}),
    "apertus": {},  # xIELU with its learned per-layer scalars, Q/K norms before NeoX RoPE, no gate
    "apertus-llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 16, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0}),  # as released: Llama 3.1 RoPE scaling
}
# llama.cpp's CPU GELU: a 16-bit table
GELU = ("gemma", "phi", "starcoder2", "gpt_neox", "gpt2", "falcon", "bloom", "mpt", "gpt_bigcode")


@torch.no_grad()
@pytest.mark.parametrize("model_type", list(DENSE))
def test_llama_cpp_runs_more_dense_exports_as_the_merged_model(tmp_path, tiny_tokenizer, model_type):
    from qlora.model.gguf_export import export_gguf
    from random_adapters import randomize_lora_b
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, model_type.split("-")[0], **DENSE[model_type])
    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)  # LoRA A: the same adapter whichever tests ran before
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    randomize_lora_b(model, seed=0)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    ids = tokenizer(MOE_PROMPT)["input_ids"]
    merged = merge(model, dtype=torch.float32)
    expected = merged(torch.tensor([ids])).logits[0]

    llm = _llama_cpp(tmp_path / "m.gguf")
    llm.eval(ids)
    # llama.cpp's CPU GELU (Gemma, Phi-2, StarCoder2, the GPT-style, MPT) reads a 16-bit table: up to 8e-4 measured
    # (Pythia's, Falcon's and MPT's exact GELU, run as llama.cpp's tanh one, within that); the others agree to ~1e-6
    error = _relative(torch.tensor(llm.scores[: len(ids)]), expected)
    assert error < (2e-3 if model_type.split("-")[0] in GELU else 1e-5)
    tokens, margin = _greedy(merged, ids, 16)
    assert margin > 2 * error  # no near-tie that this much error could flip: equal tokens are a real check
    assert _llama_cpp_greedy(llm, ids, 16) == tokens


# The architectures added after DBRX, exported as f16 and q8_0 and run with llama.cpp's defaults (f16 KV cache,
# activations rounded to f16 or 8 bits before each matmul); the q8_0 file against the weights it holds
# (_q8_0_logits). Hunyuan MoE without its alpha RoPE, whose prompt routes one token between two experts 7e-3 apart
# in probability; ERNIE 4.5 MoE is left out, as its prompt routes a token that the weights' 8-bit rounding flips.
NEWER = {**{t: MOE[t] for t in ("glm4_moe", "granitemoeshared", "llama4_text")}, "hunyuan_v1_moe": dict(head_dim=8),
         **{t: DENSE[t] for t in ("gpt_bigcode", "nemotron", "minicpm3")}}


@torch.no_grad()
@pytest.mark.parametrize("model_type", list(NEWER))
def test_llama_cpp_runs_16_bit_and_q8_0_exports_of_newer_architectures(tmp_path, tiny_tokenizer, model_type):
    from qlora.model.gguf_export import export_gguf
    from random_adapters import randomize_lora_b
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, model_type, **NEWER[model_type])
    _biased_routing(model_dir)
    if model_type in MOE:
        model, tokenizer = _adapted_moe(model_dir)
    else:
        model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(0)
        qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
        randomize_lora_b(model, seed=0)
    for out_type in ("f16", "q8_0"):
        export_gguf(model.eval(), tokenizer, tmp_path / f"{out_type}.gguf", out_type)
    ids = tokenizer(MOE_PROMPT)["input_ids"]
    merged = merge(model, dtype=torch.float32)
    tokens, margin = _greedy(merged, ids, 8)
    errors = {}
    for out_type, reference in (("f16", merged(torch.tensor([ids])).logits[0]), ("q8_0", _q8_0_logits(merged, ids))):
        llm = _llama_cpp(tmp_path / f"{out_type}.gguf", f32_cache=False)
        llm.eval(ids)
        errors[out_type] = _relative(torch.tensor(llm.scores[: len(ids)]), reference)
        if margin > 2 * errors[out_type]:  # no near-tie this much error could flip: equal tokens are a real check
            assert _llama_cpp_greedy(llm, ids, 8) == tokens, out_type
    # measured: f16 5e-4 to 5e-3; q8_0 9e-3 to 7.4e-2 (1.2e-2 to 1.6e-1 against the float model)
    assert errors["f16"] < 1e-2 and errors["q8_0"] < 1e-1, errors


def test_generation_config_end_of_reply_ids_end_generation_in_llama_cpp_and_ollama(tmp_path, tiny_tokenizer):
    """A Hunyuan whose generation_config.json lists four ids that end a reply (qlora generate stops on each):
    llama.cpp ends generation on EOS, EOT, EOM and tokens it knows by name (``<|im_end|>``), so the two plain
    word tokens become EOT and EOM (as llama.cpp's converter writes Hunyuan's) and llama.cpp stops on all four;
    Ollama's list holds them all."""
    from qlora.infer.generate import default_stop_ids
    from tiny_moe import save_tiny_moe

    gguf = pytest.importorskip("gguf")
    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, "hunyuan_v1_dense", head_dim=8)
    words = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ("Ġfox", "Ġdog", "Ġfour")]
    ends = [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), *words[:2]]
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": ends}))
    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--type", "f32"]) == 0
    path = tmp_path / "out" / "model-f32.gguf"

    model, tokenizer = qlora.load_model(model_dir, quant=None, device="cpu")
    assert set(ends) <= default_stop_ids(model, tokenizer) and words[2] not in default_stop_ids(model, tokenizer)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    assert [llama_cpp.llama_vocab_is_eog(vocab, i) for i in [*ends, words[2]]] == [True, True, True, True, False]
    assert (llm.metadata["tokenizer.ggml.eot_token_id"], llm.metadata["tokenizer.ggml.eom_token_id"]) == (
        str(words[0]), str(words[1]))
    assert list(gguf.GGUFReader(path).fields["tokenizer.ggml.eos_token_ids"].contents()) == ends


def _router_margin(model, ids: list[int]) -> float:
    """The smallest gap, over the prompt's tokens and every MoE layer, between the probability of the last
    expert a token is routed to and the first one it is not."""
    gaps = []

    def hook(module, args, out):
        probs = out[0].float().softmax(-1).sort(-1, descending=True).values
        gaps.append(float((probs[:, module.top_k - 1] - probs[:, module.top_k]).min()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith(("mlp.gate", "mlp.router"))]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return min(gaps)


@torch.no_grad()
def test_llama_cpp_runs_16_bit_and_q8_0_moe_exports_from_the_cli(tmp_path, tiny_tokenizer):
    """``qlora export --adapter`` of a Qwen3-MoE with expert LoRA, as f16 and q8_0, with llama.cpp's defaults.

    llama.cpp rounds activations to f16 (to 8 bits for q8_0) before each matmul, so its logits move by
    3e-3 (7e-2 for q8_0, measured) of the largest logit. A router choosing between two experts of nearly
    equal probability can then pick the other one, and that token's output changes completely: rounding,
    not an export error. So the test first checks that the prompt routes with clear margins and that the
    greedy path leads by more than twice the f16 tolerance; then equal f16 logits and tokens are a real
    check of the file. The q8_0 tokens (4, as for the dense q8_0 export above) are a looser check.
    """
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, "qwen3_moe", norm_topk_prob=True)
    model, tokenizer = _adapted_moe(model_dir)
    qlora.save_adapter(model, tmp_path / "adapter")
    ids = tokenizer(MOE_PROMPT)["input_ids"]
    merged = merge(model, dtype=torch.float32)
    expected = merged(torch.tensor([ids])).logits[0]
    tokens, margin = _greedy(merged, ids, 8)
    assert _router_margin(merged, ids) > 0.01 and margin > 0.03

    for out_type, tolerance, n in (("f16", 1e-2, 8), ("q8_0", 1e-1, 4)):
        assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / out_type), "--type", out_type]) == 0
        llm = _llama_cpp(tmp_path / out_type / f"model-{out_type}.gguf", f32_cache=False)
        llm.eval(ids)
        reference = expected if out_type == "f16" else _q8_0_logits(merged, ids)
        error = _relative(torch.tensor(llm.scores[: len(ids)]), reference)
        assert error < tolerance, (out_type, error)  # measured 2.8e-3; q8_0 4.6e-2 (7.0e-2 from the float model)
        assert _llama_cpp_greedy(llm, ids, n) == tokens[:n], out_type


@torch.no_grad()
def test_llama_cpp_runs_dbrx_exports_from_the_cli(tmp_path, tiny_tokenizer):
    """DBRX, its experts stored as 2-D ``(experts * ff, hidden)`` stacks in 4 bits (qlora's own layout for them),
    with LoRA on its fused ``Wqkv`` and ``out_proj``: ``qlora export --adapter`` as f32, f16 and q8_0. llama.cpp
    reads ``w1``/``v1`` as ``[experts, ff, hidden]`` and ``w2`` transposed; a wrong view mixes experts' rows and
    fails by far. Tolerances as for the Qwen3-MoE CLI test above (f16/q8_0 activations in llama.cpp)."""
    from random_adapters import randomize_lora_b
    from tiny_own_layouts import save_tiny

    model_dir = save_tiny(tmp_path / "m", tiny_tokenizer, "dbrx")
    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    randomize_lora_b(model, seed=0)
    qlora.save_adapter(model, tmp_path / "adapter")
    ids = tokenizer(MOE_PROMPT)["input_ids"]
    base = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")[0](torch.tensor([ids])).logits[0]
    merged = merge(model.eval(), dtype=torch.float32)
    expected = merged(torch.tensor([ids])).logits[0]
    assert _relative(base, expected) > 0.05  # the adapter matters: a file without it fails by far
    tokens, margin = _greedy(merged, ids, 8)

    for out_type, tolerance, n in (("f32", 1e-5, 8), ("f16", 1e-2, 8), ("q8_0", 1e-1, 4)):
        assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / out_type), "--type", out_type]) == 0
        llm = _llama_cpp(tmp_path / out_type / f"model-{out_type}.gguf", f32_cache=out_type == "f32")
        assert llm.metadata["general.architecture"] == "dbrx" and llm.metadata["dbrx.expert_count"] == "4"
        llm.eval(ids)
        reference = _q8_0_logits(merged, ids) if out_type == "q8_0" else expected
        error = _relative(torch.tensor(llm.scores[: len(ids)]), reference)
        assert error < tolerance, (out_type, error)  # measured 3.5e-6, 6.8e-3, 9.2e-2 (9.8e-2 from the float model)
        assert out_type != "f32" or margin > 2 * error
        if margin > 2 * error:  # no near-tie this much error could flip: equal tokens are a real check
            assert _llama_cpp_greedy(llm, ids, n) == tokens[:n], out_type


def test_llama_cpp_runs_a_trained_gpt_oss_export_from_the_cli(tmp_path):
    """``qlora train --target-parameters`` (LoRA on the expert weights) on a tiny gpt-oss with an o200k tokenizer
    and the real harmony template, then ``qlora export --adapter`` as f32 and f16. llama.cpp renders the embedded
    template and tokenizes the prompt as transformers does; the f32 file's logits equal the merged model's (f32 KV
    cache, as for the other MoEs), and the f16 file's with llama.cpp's defaults, on a prompt that passes the
    routing-margin guard of the Qwen3-MoE test above (longer ones hold near-tied routings that f16 rounding flips:
    measured, one flipped token on a 58-token prompt of a hidden-64 variant)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from chat_families import O200K, family_tokenizer
    from qlora.train.config import TrainConfig
    from qlora.train.data import demo_data_path
    from qlora.train.trainer import Trainer
    from tiny_moe import save_tiny_moe

    base = save_tiny_moe(tmp_path / "base", family_tokenizer("gpt-oss", split=O200K), "gpt_oss", **GPT_OSS)
    Trainer(TrainConfig(model=str(base), data=str(demo_data_path()), output=str(tmp_path / "adapter"),
                        overwrite=True, rank=8, alpha=16, dropout=0.0, lr=3e-3, max_steps=30, batch_size=4,
                        seq_len=256, optim="adamw", logging_steps=10, progress=False, seed=0,
                        # the harmony template renders today's date into every row: pinned, the trained model
                        # (and the routing margins checked below) does not change with the day the test runs
                        template_date="2026-11-24",
                        target_parameters="mlp.experts.gate_up_proj,mlp.experts.down_proj")).run()
    for out_type in ("f32", "f16"):
        assert main(["export", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / out_type), "--type", out_type]) == 0
    model, tokenizer = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "adapter")
    assert any("experts.lora_B" in n for n, _ in model.named_parameters())  # the expert weights were adapted
    merged = merge(model, dtype=torch.float32)

    for out_type, prompt, tolerance, n in (("f32", MOE_PROMPT, 1e-5, 16), ("f16", "Hello there!", 1e-2, 8)):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = merged(torch.tensor([ids])).logits[0]
        tokens, margin = _greedy(merged, ids, n)
        llm = _llama_cpp(tmp_path / out_type / f"model-{out_type}.gguf", f32_cache=out_type == "f32", n_ctx=512)
        llm.eval(ids)
        error = _relative(torch.tensor(llm.scores[: len(ids)]), expected)
        assert error < tolerance, out_type  # measured 1.6e-6 (f32), 1.2e-3 (f16)
        if out_type == "f16":
            assert _router_margin(merged, ids) > 0.01 and margin > 0.03
        assert margin > 2 * error
        assert _llama_cpp_greedy(llm, ids, n) == tokens, out_type

    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = llm.metadata["tokenizer.chat_template"]
    eos, bos = (llm._model.token_get_text(i) for i in (llm.token_eos(), llm.token_bos()))
    assert Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(messages=messages).prompt == prompt
    # the o200k split and harmony's special tokens
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == tokenizer(prompt)["input_ids"]


@torch.no_grad()
def test_llama_cpp_rounds_gpt_oss_yarn_range_to_whole_dimensions(tmp_path, tiny_tokenizer):
    """The released gpt-oss configs ask for YaRN's correction range unrounded (``truncate: false``, as OpenAI's
    reference computes it); llama.cpp always rounds it outward to whole dimensions and has no GGUF key to say
    otherwise. The export is what llama.cpp's converter writes; this pins what llama.cpp then computes: exactly
    transformers' rounded YaRN, which moves the unrounded model's logits by ~5e-3 of the largest on a 20-token
    prompt (RoPE is the identity at position 0, so the first token agrees to float precision)."""
    from qlora.model.gguf_export import export_gguf
    from tiny_moe import save_tiny_moe

    expected = {}
    for truncate in (False, True):
        config = dict(GPT_OSS, rope_parameters={**GPT_OSS_YARN, "truncate": truncate})
        model_dir = save_tiny_moe(tmp_path / f"m-{truncate}", tiny_tokenizer, "gpt_oss", **config)
        model, tokenizer = _adapted_moe(model_dir)
        ids = tokenizer(MOE_PROMPT)["input_ids"]
        expected[truncate] = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
        if not truncate:
            export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    llm = _llama_cpp(tmp_path / "m.gguf")
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert _relative(got, expected[True]) < 1e-5
    assert _relative(got[:1], expected[False][:1]) < 1e-5
    assert 1e-3 < _relative(got, expected[False]) < 2e-2


def _q8_0_logits(merged, ids: list[int]) -> torch.Tensor:
    """The logits of ``merged`` with the weights a q8_0 file holds (tests/q8_0_reference.py): what llama.cpp's q8_0
    logits are compared with, so the tolerance is for its activation rounding alone (roughly halves the error
    measured against the float model on most tiny models; DBRX's stays, ERNIE 4.5 MoE's near-tied router flips)."""
    import copy

    from q8_0_reference import q8_0_round_trip

    rounded = copy.deepcopy(merged)
    q8_0_round_trip(rounded)
    with torch.no_grad():
        return rounded(torch.tensor([ids])).logits[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
