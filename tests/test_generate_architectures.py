"""qlora's own decoding loops give transformers' tokens on every kind of cache.

``stream_tokens`` (``qlora generate``/``chat``) and the continuous batcher (``qlora serve``) each
drive the model's cache themselves; ``model.generate(do_sample=False)`` on the same loaded model is
the oracle. One tiny model per way a cache differs from Llama's: sliding windows crossed within
the prompt (window 4; Gemma 3 with its local and global rope bases), Qwen3's query and key norms, logit softcapping, attention sinks, learned absolute positions and ALiBi,
mixture-of-experts routing, multi-head latent attention (MLA), recurrent state (Mamba, RWKV) and
hybrid attention/recurrent caches (LFM2, Bamba, Jamba, Granite 4, Zamba with one attention block shared by its
hybrid layers, RecurrentGemma, whose forward does not return its cache), rotary angles that change past a length
(Phi-3's long-context rope, dynamic NTK), Mamba-2, a looped recurrent block with a
cache per loop (Dory), a model
whose cache is no cache ``generate`` passes back (Reformer) and one whose ``prepare_inputs_for_generation`` feeds it
the whole sequence after a cache (CPM-Ant); sparse-attention indexers (DeepSeek-V3.2), a hybrid of Mamba,
expert, attention and MLP blocks (Nemotron-H), convolution and experts (LFM2-MoE) and clipped fused QKV (DBRX).
Requests of different lengths are submitted together, so the
batcher joins rows of different lengths (or, for a cache it cannot re-batch, says so at start and
decodes them one at a time).
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from qlora.infer.batcher import ContinuousBatcher, Event, Request
from qlora.infer.generate import SamplingOptions, stream_tokens
from qlora.model.load import load_model

# initializer_range 0.5: a random model at the usual 0.02 repeats its last token, whatever its cache holds
_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None
SMALL = dict(initializer_range=0.5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, max_position_embeddings=256)
# model type -> (config overrides, batched: whether the batcher can re-batch its cache)
ARCHS = {
    "mistral": (dict(sliding_window=4), True),
    "gemma2": (dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=False), True),
    "cohere2": (dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]), True),
    "gpt_oss": (dict(head_dim=16, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"]), True),
    # local and global rope bases, sliding window 4 (0.05: Gemma's scaled embeddings repeat one token at 0.5)
    "gemma3_text": (dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                         initializer_range=0.05), True),
    "qwen3": (dict(head_dim=16), True),  # query and key norms
    "gpt2": (dict(n_positions=256), True),
    "opt": (dict(ffn_dim=128, word_embed_proj_dim=64, init_std=0.5), True),
    "bloom": ({}, True),
    "qwen2_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32), True),
    "deepseek_v2": (dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=32,
                         kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         first_k_dense_replace=1, n_group=1, topk_group=1), False),
    "mamba": (dict(state_size=8), False),
    "falcon_mamba": (dict(state_size=8), False),  # RMS norms on B, C and dt; its cache keyword is `cache` in 5.24
    "rwkv": (dict(attention_hidden_size=64, context_length=256), False),
    "lfm2": (dict(layer_types=["conv", "full_attention"]), False),
    "recurrent_gemma": (dict(block_types=["recurrent", "attention"], lru_width=64, attention_window_size=4), False),
    "bamba": (dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8), False),
    # returns its cache as past_buckets_states, which generate does not pass back: the whole sequence every step
    "reformer": (dict(is_decoder=True, axial_pos_shape=[16, 16], axial_pos_embds_dim=[32, 32], attention_head_size=16,
                      feed_forward_size=128, attn_layers=["local", "lsh"]), False),
    # its forward takes the whole sequence at every step and cuts the cached part off itself
    "cpmant": (dict(dim_ff=128, dim_head=16, prompt_length=8, position_bias_num_buckets=32,
                    position_bias_max_distance=64), False),
    # DeepSeek sparse attention: an indexer keeps the top 4 keys of the 12-token prompt
    "deepseek_v32": (dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                          head_dim=8,
                          first_k_dense_replace=1, n_group=1, topk_group=1, index_topk=4, index_head_dim=16,
                          index_n_heads=2), False),
    # Mamba, mixture-of-experts, attention and MLP blocks, one each
    "nemotron_h": (dict(num_hidden_layers=4, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"],
                        mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8,
                        head_dim=16, n_routed_experts=4, moe_intermediate_size=32,
                        moe_shared_expert_intermediate_size=32), False),
    "lfm2_moe": (dict(layer_types=["conv", "full_attention"], num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, num_dense_layers=1), False),
    # Mamba and attention layers, experts on every other one
    "jamba": (dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8,
                   use_mamba_kernels=False), False),  # 4.x refuses the (CUDA) kernels on a CPU
    # Mamba-2 (multi-head SSM, chunked scan)
    "mamba2": (dict(num_heads=4, head_dim=32, state_size=8, n_groups=1, chunk_size=8, expand=2), False),
    # Mamba-2 and attention layers with experts (Granite 4)
    "granitemoehybrid": (dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8,
                              mamba_chunk_size=8, num_local_experts=4, num_experts_per_tok=2,
                              shared_intermediate_size=32), False),
    # one shared attention block run by every hybrid layer (its weights tied across layers 2 and 3: Mamba, Mamba,
    # then hybrid where i % period == offset, as 4.x and 5.x both derive the layer kinds)
    "zamba": (dict(num_hidden_layers=4, attn_layer_period=1, attn_layer_offset=0, attention_hidden_size=128, attention_head_dim=32, mamba_dt_rank=8, mamba_d_state=8,
                   use_mamba_kernels=False), False),
    # input, looped recurrent (a cache per loop) and output blocks, sliding window 4
    "dory": (dict(num_hidden_layers=3, n_input_layers=1, n_output_layers=1, n_recurrent_layers=1, head_dim=16,
                  sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                  rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                   for t in ("full_attention", "sliding_attention")}), True),
    # long-context rope (Phi-3 128k, Phi-3.5): short factors up to 16 tokens, long ones past; generate drops its cache
    # and runs the whole sequence again where the 12-token prompt's reply passes 16 tokens, and a batch would give
    # every row the long factors once one row passes 16, so the batcher decodes one request at a time
    "phi3": (dict(original_max_position_embeddings=16, rope_scaling=dict(
        type="longrope", short_factor=[1.0] * 8, long_factor=[2.0 + 0.1 * i for i in range(8)])), False),
    # dynamic NTK rope: its base grows once a sequence passes its 16 trained positions
    "llama": (dict(max_position_embeddings=16, rope_scaling=dict(rope_type="dynamic", factor=2.0)), False),
    # multi-head latent attention with interleaved rotary halves (A.X K1); transformers' own generate fails on a
    # left-padded batch of it, so the batcher decodes one request at a time
    "axk1": (dict(head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=32,
                  kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                  first_k_dense_replace=1), False),
    # fused Wqkv clipped to +-8 and fused experts; a fresh config lacks the rope_theta and clip_qkv its attention reads.
    # No ffn_config hidden_size: 4.x's DbrxFFNConfig refuses the key, 5.x copies d_model into it
    "dbrx": (dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, attn_config=dict(
        kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0), ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4,
                                                                         moe_top_k=2)), True),
    # dots3-note's text model: MLA layers whose sparse indexer keeps 4 of the prompt's keys (an indexed cache the
    # batcher cannot re-batch) beside sliding MLA layers of their own sizes (the swa_ keys), a dense then an
    # expert MLP
    "dots3_note_text": (dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                             qk_nope_head_dim=8, v_head_dim=16, head_dim=16, index_topk=4, index_head_dim=16,
                             index_n_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_experts_intermediate_size=32, sliding_window=4,
                             layer_types=["indexed_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"],
                             swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=32,
                             swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=16), False),
}


def _has(config, key: str) -> bool:
    """Whether ``config`` has ``key``: a per-layer one (dots3-note's heads) raises when read globally."""
    try:
        return hasattr(config, key)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer):
    def build(arch: str):
        if arch not in CONFIG_MAPPING_NAMES:
            pytest.skip(f"this transformers has no {arch!r} models")
        d = tmp_path_factory.mktemp(arch)
        default = AutoConfig.for_model(arch)
        small = {k: v for k, v in SMALL.items() if _has(default, k)}
        config = AutoConfig.for_model(
            arch, vocab_size=len(tiny_tokenizer), bos_token_id=tiny_tokenizer.bos_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
            **{**small, **ARCHS[arch][0]})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        return load_model(d, quant="nf4", compute_dtype=torch.float32, device="cpu")
    return build


def _batched(model, tokenizer, requests: list[tuple[list[int], int]],
             stop: int | frozenset[int]) -> tuple[list[list[int]], ContinuousBatcher]:
    """Each request's tokens (prompt ids, new tokens) when all are submitted together to one batcher."""
    done = threading.Semaphore(0)
    tokens: list[list[int]] = [[] for _ in requests]
    errors: list[str | None] = [None] * len(requests)

    def emitter(i):
        def emit(event: Event) -> None:
            errors[i] = errors[i] or event.error
            if event.finish_reason:
                done.release()
        return emit

    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=len(requests), context_length=256)
    stops = frozenset({stop}) if isinstance(stop, int) else stop
    reqs = [Request(ids, None, SamplingOptions(max_new_tokens=n, temperature=0), emitter(i), stop_ids=stops)
            for i, (ids, n) in enumerate(requests)]
    advance = batcher._advance

    def record(row, token, logits):  # the tokens themselves, not their text (tiny vocabularies merge pieces)
        tokens[reqs.index(row.request)].append(token)
        return advance(row, token, logits)

    batcher._advance = record
    batcher.start()
    try:
        with batcher.paused():
            for r in reqs:
                batcher.submit(r)
        for _ in reqs:
            assert done.acquire(timeout=60)
    finally:
        batcher.close()
    assert errors == [None] * len(requests), errors
    return tokens, batcher


@pytest.mark.parametrize("arch", list(ARCHS))
def test_stream_and_batcher_give_transformers_greedy_tokens(arch, built):
    if arch == "cpmant" and not _V5:
        pytest.skip("transformers 4.x's own generate fails for CPM-Ant: its forward needs the whole ids at every "
                    "step, which only 5.x's prepare_inputs_for_generation passes")
    model, tokenizer = built(arch)
    _check_greedy(model, tokenizer, arch, ARCHS[arch][1])


def test_a_model_counting_its_own_positions_decodes_alone_with_transformers_tokens(tmp_path, tiny_tokenizer):
    """Kosmos-2.5's embedding layer counts positions from its padding index and the cache length (its
    prepare_inputs_for_generation drops position ids): ids counted from 0 shifted every position, so qlora's tokens
    left transformers' (the sweep of 5.24's architectures). It gets none now, and decodes one request at a time."""
    from transformers import AutoModelForImageTextToText

    if "kosmos-2.5" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Kosmos-2.5")
    ids = dict(bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
               pad_token_id=tiny_tokenizer.pad_token_id)
    config = AutoConfig.for_model("kosmos-2.5", text_config=dict(
        embed_dim=64, layers=2, attention_heads=4, ffn_dim=128, vocab_size=len(tiny_tokenizer), init_std=1.0,
        max_position_embeddings=256, **ids), vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16), **ids)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    _check_greedy(model, tokenizer, "kosmos-2.5", batched=False)


def _check_greedy(model, tokenizer, arch: str, batched: bool) -> None:
    """stream_tokens and the batcher (three requests of different lengths) give model.generate's greedy tokens;
    the batcher re-batches the cache where ``batched``, else decodes one request at a time."""
    stop = tokenizer.eos_token_id
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, len(tokenizer), (1, n), generator=g) for n in (12, 5, 9)]
    news = [16, 7, 11]
    expected = []
    for p, n in zip(prompts, news):
        ref = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)[0, p.shape[1]:].tolist()
        expected.append(ref[:ref.index(stop) + 1] if stop in ref else ref)
    if len(set(expected[0])) <= 2 and not _V5:  # the random weights transformers 4.x draws for the config
        pytest.skip(f"transformers 4.x's random {arch} model repeats or ends at once, which would hide a wrong cache")
    assert len(set(expected[0])) > 2, expected  # a degenerate model would hide a wrong cache

    alone = [list(stream_tokens(model, p, SamplingOptions(max_new_tokens=n, temperature=0), {stop}))
             for p, n in zip(prompts, news)]
    assert alone == expected

    tokens, batcher = _batched(model, tokenizer, [(p[0].tolist(), n) for p, n in zip(prompts, news)], stop)
    assert tokens == expected
    assert (batcher.unbatchable is None) == batched, batcher.unbatchable
    assert batcher.load()["max_rows_in_step"] == (3 if batched else 1)


@pytest.mark.parametrize("arch, overrides", [
    ("xlm", dict(emb_dim=64, n_layers=2, n_heads=4)),  # appends a mask token to the ids
    ("xlnet", dict(d_model=64, n_layer=2, n_head=4, d_inner=128)),  # appends a dummy token, permutation masks
])
def test_a_model_whose_generate_feeds_other_ids_is_refused_before_decoding(arch, overrides, tmp_path, tiny_tokenizer,
                                                                          capsys):
    from qlora.cli.main import main
    from qlora.errors import UsageError
    from qlora.infer.generate import decode_problem

    config = AutoConfig.for_model(arch, vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id,
                                  **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, quant=None, compute_dtype=torch.float32, device="cpu")
    assert "prepare_inputs_for_generation feeds the forward other token ids" in decode_problem(model)
    with pytest.raises(UsageError, match="qlora cannot decode"):
        next(stream_tokens(model, torch.tensor([[5, 6, 7]]), SamplingOptions(max_new_tokens=3, temperature=0)))
    code = main(["generate", "--model", str(tmp_path), "--quant", "none", "--compute-dtype", "fp32", "--template",
                 "none", "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 2 and "qlora cannot decode this model" in out.err and "Traceback" not in out.err
    assert out.out == ""  # nothing decoded


def test_a_model_whose_cached_forward_fails_in_transformers_is_refused_before_decoding(tmp_path, tiny_tokenizer,
                                                                                      capsys):
    """transformers 5's BLT builds its cache from a config without num_hidden_layers: its own generate fails
    unless given use_cache=False, so qlora's decoding refuses it with that reason, not a traceback."""
    from qlora.cli.main import main
    from qlora.errors import UsageError
    from qlora.infer.generate import decode_problem
    from qlora.model.quantize import non_text_names

    if "blt" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no BLT models")
    v = len(tiny_tokenizer)
    part = dict(vocab_size=v, hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=4, sliding_window=16, max_position_embeddings=256)
    config = AutoConfig.for_model(
        "blt", vocab_size=v, max_position_embeddings=256, patch_size=4, encoder_hash_byte_group_size=[3, 4],
        encoder_hash_byte_group_vocab=64, pad_token_id=tiny_tokenizer.pad_token_id,
        patcher_config=dict(part, head_dim=8), encoder_config=dict(part, hidden_size_global=64),
        decoder_config=dict(part, hidden_size_global=64, head_dim=8),
        global_config=dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=16, max_position_embeddings=256))
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).eval()
    ref.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    prompt = torch.tensor([[5, 6, 7, 8]])
    if not isinstance(_raised(lambda: ref.generate(prompt, max_new_tokens=2, do_sample=False)), AttributeError):
        pytest.skip("this transformers' BLT generates with a cache: nothing to refuse")
    ref.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=False)  # without a cache it runs

    model, _ = load_model(tmp_path, quant=None, compute_dtype=torch.float32, device="cpu")
    assert not non_text_names(model)  # its patcher, encoder, decoder and global configs are all text
    assert "its forward fails when asked to keep a cache (AttributeError" in decode_problem(model)
    with pytest.raises(UsageError, match="qlora cannot decode"):
        next(stream_tokens(model, prompt, SamplingOptions(max_new_tokens=3, temperature=0)))
    code = main(["generate", "--model", str(tmp_path), "--quant", "none", "--compute-dtype", "fp32", "--template",
                 "none", "--prompt", "Hello", "--max-new-tokens", "3", "--temperature", "0"])
    out = capsys.readouterr()
    assert code == 2 and "qlora cannot decode this model (BltForCausalLM)" in out.err and "Traceback" not in out.err
    assert out.out == ""


def _raised(call) -> BaseException | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test asks which error transformers itself raises
        return exc
    return None


@pytest.mark.parametrize("arch, overrides, switch", [
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)), None),
    ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)), None),
    ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), None),
    ("llama", dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), 256),
    ("gemma3_text", dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"]), None),
    ("phi3", {}, None),
    ("phi3", dict(original_max_position_embeddings=64, rope_scaling=dict(
        type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)), 64),
])
def test_the_length_where_rotary_angles_change_is_read_from_the_config(arch, overrides, switch):
    """Only long-context (longrope) and dynamic NTK rope change their angles with the length, at the trained length
    their config names (transformers 4.x's rope_scaling and 5.x's rope_parameters alike)."""
    from qlora.infer.rope_switch import rope_switch_length

    if arch not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {arch!r} models")
    small = {k: v for k, v in SMALL.items() if hasattr(AutoConfig.for_model(arch), k)}
    assert rope_switch_length(AutoConfig.for_model(arch, **{**small, **overrides})) == switch
