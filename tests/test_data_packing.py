"""Packing isolates examples (issue 11, item 5), collation and shuffling."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from qlora.errors import UsageError
from qlora.train.data.packing import UNPACKABLE_BEFORE_5
from qlora.train.data import (
    IGNORE_INDEX, TEMPLATES, Example, attention_windows, check_packing_supported, count_trainable_tokens,
    example_positions, pack_examples, packed_collate, pad_collate, pad_token_id, shuffled_indices, tokenize_dataset,
)

QUESTIONS = ["Hello", "What is two plus two?", "Hi there!", "The quick brown fox jumps over the lazy dog.", "def add(a, b)"]


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):
    examples = [
        Example(({"role": "user", "content": q}, {"role": "assistant", "content": QUESTIONS[(i + 1) % 5] * (1 + i % 2)}),
                None, f"line {i}")
        for i, q in enumerate(QUESTIONS * 2)
    ]
    kept, _ = tokenize_dataset(examples, tiny_tokenizer, TEMPLATES["chatml"], seq_len=96)
    return kept


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy per target position (0 where ignored), shape (batch, L-1)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_per_example(tiny_model_dir, tiny_tokenizer, tokenized, attn):
    _assert_packed_loss_equals_alone(tiny_model_dir, tiny_tokenizer, tokenized, attn)


@pytest.mark.parametrize("arch, config, attn", [
    ("mistral", {"sliding_window": 8}, "sdpa"),  # every layer sliding, one mask
    ("gemma3", {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}, "eager"),  # a mapping
], ids=["mistral-all-sliding", "gemma3-mixed"])
def test_packed_loss_equals_unpacked_with_sliding_window_layers(tmp_path, tiny_tokenizer, tokenized, arch, config,
                                                                attn):
    """Examples longer than the window: a packed mask without it let sliding layers see the whole example
    (per-example losses 0.6-1.2 off)."""
    from qlora.model.tiny import build_tiny_model

    assert max(len(e.input_ids) for e in tokenized) > 2 * config["sliding_window"]
    model_dir = build_tiny_model(tmp_path / arch, tokenizer=tiny_tokenizer, arch=arch, **config)
    _assert_packed_loss_equals_alone(model_dir, tiny_tokenizer, tokenized, attn)


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
             head_dim=8, max_position_embeddings=256)


@pytest.mark.parametrize("arch, config, attn", [
    ("roberta", dict(is_decoder=True), "sdpa"),  # positions from padding_idx + 1: 3.8-6.1 off from 0-based ones
    ("moshi", dict(sliding_window=8), "sdpa"),  # a window its attention never applies: 4.2 off with it in the mask
    ("opt", dict(ffn_dim=64, word_embed_proj_dim=32), "sdpa"),  # learned positions with an offset
    ("gpt_neox", {}, "eager"),  # partial rotary
    ("mpt", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2), "eager"),  # ALiBi, no position_ids
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8), "eager"),  # sinks, window, MoE
    ("cohere2", dict(sliding_window=8), "sdpa"),  # sliding layers with rotary, a full one without
    ("smollm3", dict(no_rope_layers=[1, 0]), "sdpa"),  # a layer without rotary positions
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "eager"),
    # Llama 4's chunked layers see their chunk of the example alone (refused before), its no-rope layers all of it
    ("llama4_text", dict(attention_chunk_size=8, intermediate_size_mlp=64, num_local_experts=2), "sdpa"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_packed_loss_equals_unpacked_across_position_schemes(tiny_tokenizer, tokenized, arch, config, attn):
    """Each example of a packed row as alone, across the ways transformers' causal LMs place tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = dict(vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id,
               bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    made = AutoConfig.for_model(arch, **SMALL, **ids, **config)
    before_5 = importlib.util.find_spec("transformers.initialization") is None
    if arch == "moshi" and before_5:
        pytest.skip("transformers 4's Moshi applies its window a position off qlora's mask (0.12 here); a real "
                    "Moshi's window, 3000, is its whole context")
    if arch in UNPACKABLE_BEFORE_5 and before_5:
        with pytest.raises(UsageError, match=f"not supported for {arch} models under transformers 4"):
            attention_windows(made)  # 4.57: RoBERTa's forward refuses a 4D mask, MPT's ALiBi spans the row
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(made, attn_implementation=attn, dtype=torch.float32)
    _assert_model_packs_as_alone(model.eval(), tiny_tokenizer, tokenized, attn)


@pytest.mark.parametrize("arch, config, match", [
    ("bart", {}, "bart models: its decoder numbers positions by their place in the row"),
    ("mbart", {}, "mbart models: its decoder numbers positions"),
    ("bloom", {}, "bloom models: its ALiBi bias is built from a 2D padding mask"),
    ("falcon", dict(alibi=True), "falcon models with alibi: true in config.json: its ALiBi bias"),
    ("xlnet", {}, "xlnet models: its attention takes no per-token 4D mask"),
])
def test_packing_is_refused_where_positions_or_masks_span_the_row(arch, config, match):
    """Measured on every causal LM of transformers 5.24: BART-like decoders give packed examples other positions
    (per-example losses 0.02-1.4 off), BLOOM and Falcon-RW fail on a 4D mask (ValueError inside their forward)."""
    from transformers import AutoConfig

    with pytest.raises(UsageError, match=match):
        attention_windows(AutoConfig.for_model(arch, **config))
    assert attention_windows(AutoConfig.for_model("falcon")) == {"full_attention": None}  # rotary Falcon packs


def test_packing_is_refused_for_layers_that_carry_state_across_examples():
    from transformers import PretrainedConfig

    assert attention_windows(PretrainedConfig()) == {"full_attention": None}
    assert attention_windows(PretrainedConfig(sliding_window=16)) == {"sliding_attention": 16}
    mixed = PretrainedConfig(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2)
    assert attention_windows(mixed) == {"sliding_attention": 16, "full_attention": None}
    with pytest.raises(UsageError, match="--packing is not supported with this model's linear_attention layers"):
        attention_windows(PretrainedConfig(layer_types=["linear_attention", "full_attention"]))
    chunked = PretrainedConfig(attention_chunk_size=8, layer_types=["chunked_attention", "full_attention"])
    assert attention_windows(chunked) == {"chunked_attention": 8, "full_attention": None}
    with pytest.raises(UsageError, match="'flash_attention_2' for this model's chunked attention layers"):
        check_packing_supported("flash_attention_2", attention_windows(chunked))  # no 4D mask there
    # recurrent models without attention heads (RWKV, xLSTM) and 4.x hybrids naming their Mamba layers otherwise
    from transformers import AutoConfig

    for config in (AutoConfig.for_model("rwkv"), PretrainedConfig(layers_block_type=["attention", "mamba"])):
        with pytest.raises(UsageError, match="--packing is not supported"):
            attention_windows(config)
    # Nemotron-H's MLP and MoE blocks carry no state: only its attention layers need a mask, and a refusal names
    # only the layers that carry state (it named "moe" and "full_attention" from layers_block_type)
    with pytest.raises(UsageError, match="this model's mamba layers: their state"):
        attention_windows(PretrainedConfig(layers_block_type=["full_attention", "mamba", "moe", "mlp"]))
    assert attention_windows(PretrainedConfig(layer_types=["full_attention", "mlp", "moe"])) == {"full_attention": None}


def _assert_packed_loss_equals_alone(model_dir, tokenizer, tokenized, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()
    _assert_model_packs_as_alone(model, tokenizer, tokenized, attn)


def _assert_model_packs_as_alone(model, tokenizer, tokenized, attn):
    """Each packed example's summed token loss equals its loss alone; the trained tokens are the same."""
    rows = pack_examples(tokenized, seq_len=96)
    assert len(rows) < len(tokenized) and len({len(r.input_ids) for r in rows}) > 1  # really packed, and padded
    batch = packed_collate(rows, pad_token_id(tokenizer), attn, torch.float32, attention_windows(model.config),
                           numbering=example_positions(model))
    with torch.no_grad():
        packed = per_token_loss(model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits,
                                batch["labels"])
        unpacked = {}
        for e in tokenized:
            single = pad_collate([e], pad_token_id(tokenizer))
            unpacked[e.index] = per_token_loss(model(input_ids=single["input_ids"], use_cache=False).logits,
                                               single["labels"]).sum()
    for i, row in enumerate(rows):
        seq = torch.tensor(row.sequence_ids[1:])  # the sequence of each target position
        for k, index in enumerate(row.indices):
            got = packed[i, : len(seq)][seq == k].sum()
            torch.testing.assert_close(got, unpacked[index], atol=1e-4, rtol=0)
    assert count_trainable_tokens(batch) == sum(e.num_trainable for e in tokenized)


def test_position_ids_alone_leak_when_a_cache_is_built(tiny_model_dir, tokenized):
    """Why qlora passes a 4D mask: transformers infers packing from position_ids only without a KV cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    a, b = tokenized[0].input_ids, tokenized[1].input_ids
    ids = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits
        leaky = model(input_ids=ids, position_ids=positions, use_cache=True).logits[:, len(a):]
    assert (leaky - alone).abs().max() > 1e-3


def test_pack_rows_restart_positions_and_respect_seq_len(tokenized):
    rows = pack_examples(tokenized, seq_len=96)
    assert [i for r in rows for i in r.indices] == [e.index for e in tokenized]  # order kept
    for r in rows:
        assert len(r.input_ids) <= 96
        starts = [t for t, p in enumerate(r.position_ids) if p == 0]
        assert len(starts) == len(r.indices)
    with pytest.raises(UsageError, match="more than seq_len=8"):
        pack_examples(tokenized, seq_len=8)


def test_packing_refused_where_examples_cannot_be_isolated(tokenized):
    with pytest.raises(UsageError, match="--packing is not supported with attention implementation 'flex_attention'"):
        check_packing_supported("flex_attention")
    batch = packed_collate(pack_examples(tokenized, 96), 0, "flash_attention_2")
    assert "attention_mask" not in batch and "position_ids" in batch


def test_flash_attention_gets_the_rows_as_one_whose_restarts_transformers_reads_as_the_examples(tokenized):
    """transformers reads packed position_ids for flash attention only in a batch of one row (_is_packed_sequence,
    4.57 and 5.x): rows side by side let each row's examples attend to the earlier ones of their row."""
    from itertools import accumulate

    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    rows = pack_examples(tokenized, 96)
    assert len(rows) > 1
    batch = packed_collate(rows, 0, "flash_attention_2")
    assert batch["input_ids"].shape == (1, sum(len(e.input_ids) for e in tokenized))
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (boundaries, _), _ = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert boundaries.tolist() == [0, *accumulate(len(e.input_ids) for e in tokenized)]  # each example alone
    assert count_trainable_tokens(batch) == sum(e.num_trainable for e in tokenized)  # no target across a row's end


def test_shuffling_is_deterministic_per_seed_and_epoch():
    a = shuffled_indices(100, seed=3, epoch=0)
    assert a == shuffled_indices(100, seed=3, epoch=0) and sorted(a) == list(range(100))
    assert a != shuffled_indices(100, seed=3, epoch=1) and a != shuffled_indices(100, seed=4, epoch=0)
    assert a[:5] == [84, 45, 22, 1, 34]  # pinned: numpy's PCG64 stream is stable across platforms and versions


def test_a_batch_larger_than_the_packed_rows_is_refused(tiny_model_dir, tmp_path, capsys):
    """7 short examples pack into fewer rows than --batch-size 4: every step would be the whole data in one short
    micro-batch, the run of a smaller --batch-size, so it is refused, as for examples and text blocks."""
    import json

    from qlora.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n"
                            for i in range(7)))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
            "--packing", "--seq-len", "256", "--epochs", "1", "--no-progress"]
    assert main(argv + ["--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert ("--batch-size 4 is more than the 1 packed rows (of --seq-len 256 tokens) that --packing makes of "
            "the 7 examples") in err, err
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--batch-size", "1"]) == 0  # one row a micro-batch: each example once
