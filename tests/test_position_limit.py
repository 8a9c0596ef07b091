"""Inputs longer than a learned position table: refused with the option to change, not an IndexError."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qlora.cli.main import main
from qlora.model.position_limit import learned_position_limit
from qlora.model.tiny import build_tiny_model

transformers = pytest.importorskip("transformers")

TEXT = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)


SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
PROPHETNET = dict(hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1, num_decoder_layers=1,
                  num_encoder_attention_heads=2, num_decoder_attention_heads=2, max_position_embeddings=48, ngram=2,
                  pad_token_id=0)


@pytest.mark.parametrize("arch, config, limit", [
    ("gpt2", dict(n_positions=48, n_embd=32, n_layer=1, n_head=2), 48),
    ("gpt_neo", dict(max_position_embeddings=48, hidden_size=32, num_layers=1, attention_types=[[["global"], 1]],
                     num_heads=2), 48),
    ("gpt_bigcode", dict(n_positions=48, n_embd=32, n_layer=1, n_head=2), 48),
    ("opt", dict(max_position_embeddings=48, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                 word_embed_proj_dim=32), 48),  # its table has 2 more rows, an offset
    # positions numbered from padding_idx + 1 (1): 48 rows, 46 positions
    ("roberta", dict(SMALL, max_position_embeddings=48, is_decoder=True, pad_token_id=1), 46),
    ("ctrl", dict(n_positions=48, n_embd=32, n_layer=1, n_head=2, dff=64), 48),  # a fixed sinusoidal buffer
    ("gptj", dict(n_positions=48, n_embd=32, n_layer=1, n_head=2, rotary_dim=8), 48),  # its rotary angles' buffer
    ("mpt", dict(max_seq_len=48, d_model=32, n_layers=1, n_heads=2), 48),  # an ALiBi bias built to max_seq_len
    # a decoder's max_target_positions
    ("whisper", dict(d_model=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                     max_target_positions=48, decoder_start_token_id=2, pad_token_id=0), 48),
    ("reformer", dict(hidden_size=32, num_attention_heads=2, attention_head_size=16, feed_forward_size=64,
                      attn_layers=["local"], is_decoder=True, axial_pos_shape=[6, 8], axial_pos_embds_dim=[16, 16],
                      max_position_embeddings=48, local_attn_chunk_length=8), 48),  # 6 x 8 factored rows
    # clamps its main stream's positions to its 48 rows (47 past the padding row), but its predicting streams look
    # up the row after each position: 46
    ("prophetnet", PROPHETNET, 46),
    ("llama", dict(SMALL, max_position_embeddings=48), None),  # rotary, computed per call
    ("bloom", dict(hidden_size=32, n_layer=1, n_head=2), None),  # ALiBi, built to the input's length
])
def test_the_limit_is_where_transformers_fails(arch, config, limit):
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        arch, vocab_size=100, bos_token_id=1, eos_token_id=2, **config)).eval()
    assert learned_position_limit(model) == limit
    with torch.no_grad():
        if limit is None:
            model(torch.full((1, 60), 5), use_cache=False)  # past its 48 positions: runs
            return
        model(torch.full((1, limit), 5), use_cache=False)
        with pytest.raises((IndexError, RuntimeError, ValueError)):  # an index or a shape past it, Reformer's own
            model(torch.full((1, limit + 1), 5), use_cache=False)


def test_eval_refuses_rows_past_gpt2_positions_and_evaluates_them_truncated(tmp_path, tiny_tokenizer, capsys):
    model_dir = build_tiny_model(tmp_path / "gpt2", tokenizer=tiny_tokenizer, arch="gpt2", max_positions=64)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n")
    ids = tiny_tokenizer(TEXT)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(ids) > 64
    assert main(["eval", "--quant", "none", "--model", str(model_dir), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "position embeddings for 64 tokens" in err and "--seq-len 64" in err and "Traceback" not in err
    assert main(["eval", "--quant", "none", "--json", "--model", str(model_dir), "--data", str(data),
                 "--seq-len", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:64]])).logits[0, :-1]
    assert result["tokens"] == 63
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, torch.tensor(ids[1:64])).item(), rel=1e-5)


@pytest.mark.parametrize("method, row", [
    ("sft", {"text": TEXT}),
    ("dpo", {"prompt": "Say it.", "chosen": TEXT, "rejected": " no"}),
    ("kto", {"prompt": "Say it.", "completion": TEXT, "label": True}),
])
def test_train_refuses_rows_past_gpt2_positions_before_writing_anything(tmp_path, tiny_tokenizer, capsys, method,
                                                                         row):
    model_dir = build_tiny_model(tmp_path / "gpt2", tokenizer=tiny_tokenizer, arch="gpt2", max_positions=64)
    data = tmp_path / "d.jsonl"
    rows = [row, {**row, "label": False}] if method == "kto" else [row, row]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--quant", "none", "--model", str(model_dir), "--data", str(data), "--output", str(out),
            "--max-steps", "1", "--batch-size", "2", "--method", method]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "position embeddings for 64 tokens" in err and "--seq-len 64" in err and "Traceback" not in err
    assert not out.exists()
    assert main(args + ["--seq-len", "64"]) == 0
    assert (out / "adapter_model.safetensors").exists()


def test_a_lora_token_table_the_size_of_the_context_is_not_a_position_table(tiny_tokenizer):
    """A rotary model whose vocabulary is as long as its context: the LoRA-wrapped token table's own
    nn.Embedding must not be taken for a learned position table."""
    from qlora import add_lora

    config = transformers.AutoConfig.for_model("llama", vocab_size=64, max_position_embeddings=64, hidden_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    add_lora(model, r=2, target_modules=["embed_tokens", "q_proj"])
    assert learned_position_limit(model) is None


def test_a_per_layer_token_table_the_size_of_the_context_is_not_a_position_table():
    """Gemma 4's per-layer token embeddings (not the input embedding) as long as the context: a token table, and
    the rotary model runs past its context."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if "gemma4_text" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Gemma 4")
    config = transformers.AutoConfig.for_model(
        "gemma4_text", vocab_size=100, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
        max_position_embeddings=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, global_head_dim=16, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert model.model.embed_tokens_per_layer.num_embeddings == 64
    assert learned_position_limit(model) is None
    with torch.no_grad():
        model(torch.full((1, 80), 5), use_cache=False)


def test_generation_stops_at_the_learned_positions_and_a_prompt_filling_them_is_refused(tmp_path, tiny_tokenizer):
    """Prompt and reply together stay within GPT-2's table (vLLM's context rule): the reply is transformers'
    greedy tokens up to that point; a prompt that fills the table is a UsageError, not an IndexError."""
    from qlora.errors import UsageError
    from qlora.infer.generate import stream_tokens
    from qlora.infer.sampling_options import SamplingOptions

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gpt2", vocab_size=100, n_positions=24, n_embd=32, n_layer=1, n_head=2)).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    tokens = list(stream_tokens(model, prompt, SamplingOptions(temperature=0.0, max_new_tokens=100)))
    assert len(tokens) == 24 - 6
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=len(tokens), eos_token_id=None, pad_token_id=0)
    assert tokens == expected[0, 6:].tolist()
    with pytest.raises(UsageError, match="prompt is 24 tokens.*position embeddings for 24 tokens"):
        next(stream_tokens(model, torch.arange(24)[None] % 100, SamplingOptions(max_new_tokens=5)))


@pytest.mark.parametrize("arch, config", [
    ("gpt2", dict(n_positions=24, n_embd=32, n_layer=1, n_head=2)),
    ("roberta", dict(SMALL, max_position_embeddings=24, is_decoder=True, pad_token_id=1)),
    ("prophetnet", dict(PROPHETNET, max_position_embeddings=24)),
    ("llama", dict(SMALL, max_position_embeddings=24)),
])
def test_position_room_walks_the_model_once_and_answers_as_a_fresh_walk(arch, config, monkeypatch):
    """position_room runs at every generation (each chat turn, each served request): the model's modules are
    walked at the first, and every answer is the one a fresh learned_position_limit gives."""
    from qlora.errors import UsageError
    from qlora.model.position_limit import position_room

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        arch, vocab_size=100, bos_token_id=1, eos_token_id=2, **config)).eval()
    walks = []
    named_modules = model.named_modules
    monkeypatch.setattr(model, "named_modules", lambda *a, **k: walks.append(1) or named_modules(*a, **k))
    limit = learned_position_limit(model)
    one_walk, walks[:] = len(walks), []  # named_buffers walks the modules too
    for prompt in (1, 5, 20, 30):
        for wanted in (1, 3, 100):
            if limit is not None and prompt >= limit:
                with pytest.raises(UsageError, match=f"position embeddings for {limit} tokens"):
                    position_room(model, prompt, wanted)
            else:
                assert position_room(model, prompt, wanted) == (wanted if limit is None
                                                                else min(wanted, limit - prompt))
    assert len(walks) == one_walk


def test_prophetnet_generation_stops_where_its_forward_would_fail():
    """ProphetNet's generation under transformers runs one token further than a forward over prompt and reply
    can go (its cached step looks up the next row): qlora stops with prompt and reply a forward's length, as for
    GPT-2, and each token is transformers' greedy one."""
    from qlora.infer.generate import stream_tokens
    from qlora.infer.sampling_options import SamplingOptions

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "prophetnet", vocab_size=100, bos_token_id=1, eos_token_id=2, **dict(PROPHETNET, max_position_embeddings=24))
    ).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    tokens = list(stream_tokens(model, prompt, SamplingOptions(temperature=0.0, max_new_tokens=100)))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=len(tokens), eos_token_id=None, pad_token_id=0)
    assert tokens == expected[0, 6:].tolist()
    whole = torch.tensor([[5] * 6 + tokens])
    with torch.no_grad():
        model(whole, use_cache=False)
        with pytest.raises(IndexError):
            model(torch.cat([whole, whole[:, :1]], 1), use_cache=False)


def test_serve_context_is_the_position_table_where_it_is_shorter_than_the_config_says():
    """RoBERTa's table has max_position_embeddings rows, two of them before its first position: serve's context is
    the positions that run, not the config's number."""
    from qlora.cli.commands.serve import model_context_length

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "roberta", vocab_size=100, max_position_embeddings=40, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, is_decoder=True)).eval()
    context = model_context_length(model, None)
    assert context == 38
    model(torch.full((1, context), 5))
    with pytest.raises((IndexError, RuntimeError)):  # its token-type buffer or the table, by version
        model(torch.full((1, context + 1), 5))


def test_a_4bit_layer_whose_packed_codes_are_as_many_as_the_context_is_not_a_table():
    """A rotary model quantized to 4 bits: q_proj's 64 x 64 weight packs into a (2048, 1) buffer of bytes, as many
    rows as the context; it is no position table, and the model runs past that length."""
    from qlora.model.quantize import quantize_model

    config = transformers.AutoConfig.for_model("llama", vocab_size=100, max_position_embeddings=2048, hidden_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    quantize_model(model, compute_dtype=torch.float32)
    assert any(b.shape == (2048, 1) for b in model.buffers())
    assert learned_position_limit(model) is None
