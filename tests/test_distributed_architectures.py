"""Multi-process training of architectures whose structure FSDP2's wrapping must respect: equal to one process.

Mamba names both its block and the mixer inside it in ``_no_split_modules``; FSDP2 sharded the block, then found
the mixer's parameters already sharded and failed before the first step ("Invariant encountered: value was None").
RoBERTa (as BERT) names its embeddings module there too, whose word embeddings are also the tied output head's
weight: FSDP2 refused the parameter shared by two groups ("shared with a parameter already managed by another FSDP
group") at the first forward. The 2-rank run must equal one process with the same global batch: per-step loss and
gradient norm, and the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora.cli.main import main
from qlora_processes import run_qlora
from test_distributed_unreached import _argv, _assert_same_run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("architectures") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}: " + " ".join(f"w{(i * j) % 13}" for j in range(3 + i % 6))})
                            + "\n" for i in range(12)))
    return path


_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None


def _mamba(out: Path, tokenizer) -> Path:
    import transformers as tf

    # transformers 5 runs its torch scan where the mambapy package is missing; 4.x refuses use_mambapy without it
    mambapy = _V5 or __import__("importlib").util.find_spec("mambapy") is not None
    config = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                            use_mambapy=mambapy, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_fsdp_shards_the_outermost_of_nested_named_blocks():
    """Mamba's blocks are sharded, the mixers inside them stay in them."""
    import transformers as tf

    from qlora.train.distributed import decoder_layers

    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, state_size=4))
    assert {"MambaBlock", "MambaMixer"} <= set(model._no_split_modules)
    assert decoder_layers(model) == list(model.backbone.layers)


def _roberta(out: Path, tokenizer) -> Path:
    import transformers as tf

    config = tf.RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, is_decoder=True, tie_word_embeddings=True, type_vocab_size=1,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_fsdp_leaves_a_block_sharing_a_parameter_outside_it_to_the_root():
    """RoBERTa's embeddings block holds the output head's tied weight: not a group of its own; its layers are."""
    import transformers as tf

    from qlora.train.distributed import decoder_layers, unshared_blocks

    model = tf.RobertaForCausalLM(tf.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=32, is_decoder=True,
                                                   tie_word_embeddings=True))
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    blocks = decoder_layers(model)
    # the classes of _no_split_modules: transformers 5 names RoBERTa's layers, 4.x their self-attention modules
    inner = [layer if _V5 else layer.attention.self for layer in model.roberta.encoder.layer]
    assert blocks == [model.roberta.embeddings, *inner]
    assert unshared_blocks(model, blocks, set()) == inner
    # a tied weight that trains whole is not sharded: the block keeps its group
    trained = {model.lm_head.decoder.weight}
    assert unshared_blocks(model, blocks, trained) == blocks


@pytest.mark.parametrize("build", [_mamba, _roberta])
def test_fsdp_equals_one_process(build, data, tmp_path, tiny_tokenizer):
    model = build(tmp_path / "model", tiny_tokenizer)
    single = tmp_path / "single"
    assert main([*_argv(model, data, single), "--grad-accum", "2"]) == 0
    out = tmp_path / "fsdp"
    run_qlora([*_argv(model, data, out), "--nproc", "2", "--fsdp"])
    _assert_same_run(out, single)
