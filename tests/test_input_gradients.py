"""Adapters inside layers that keep their weights out of the autograd graph still train.

Reformer's reversible layers run as one autograd Function that recomputes its activations in the backward: the
graph holds only the hidden states it is given. On a frozen embedding nothing requires grad, the loss has no graph
and ``backward`` fails, so ``qlora train`` turns on input gradients when the first loss has no graph (and only then:
most models need none). transformers has no gradient checkpointing for Reformer: asking for it is a usage error.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli.main import main


@pytest.fixture(scope="module")
def reformer(tmp_path_factory, tiny_tokenizer):
    from transformers import ReformerConfig, ReformerModelWithLMHead

    path = tmp_path_factory.mktemp("reformer")
    config = ReformerConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_attention_heads=2,
                            attention_head_size=16, feed_forward_size=64, attn_layers=["local", "local"],
                            axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16], max_position_embeddings=64,
                            is_decoder=True, pad_token_id=tiny_tokenizer.pad_token_id,
                            eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    ReformerModelWithLMHead(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    data = path / "d.jsonl"
    data.write_text('{"text": "The quick brown fox jumps over the lazy dog. A paged optimizer moves its state."}\n' * 40)
    return path, data


def _argv(reformer, out, *extra) -> list[str]:
    path, data = reformer
    return ["train", "--model", str(path), "--data", str(data), "--output", str(out), "--seq-len", "64",
            "--group-texts", "8", "--batch-size", "1", "--max-steps", "2", "--no-progress", *extra]


def test_reversible_layers_train_without_checkpointing(reformer, tmp_path):
    assert main(_argv(reformer, tmp_path / "out", "--no-gradient-checkpointing")) == 0
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b and all(v.abs().sum() > 0 for v in b.values()), "an adapter inside the reversible layers did not train"


def test_checkpointing_a_model_without_it_is_a_usage_error(reformer, tmp_path, capsys):
    assert main(_argv(reformer, tmp_path / "out", "--gradient-checkpointing")) == 2
    assert "--gradient-checkpointing: ReformerModelWithLMHead does not support it" in capsys.readouterr().err
