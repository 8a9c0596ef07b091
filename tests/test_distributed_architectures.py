"""Multi-process training of architectures whose structure FSDP2's wrapping must respect: equal to one process.

Mamba names both its block and the mixer inside it in ``_no_split_modules``; FSDP2 sharded the block, then found
the mixer's parameters already sharded and failed before the first step ("Invariant encountered: value was None").
The 2-rank run must equal one process with the same global batch: per-step loss and gradient norm, and the adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlora.cli.main import main
from qlora_processes import run_qlora
from test_distributed_unreached import _argv, _assert_same_run, data  # noqa: F401 (a fixture)


def _mamba(out: Path, tokenizer) -> Path:
    import transformers as tf

    config = tf.MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                            use_mambapy=True, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
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


@pytest.mark.parametrize("build", [_mamba])
def test_fsdp_equals_one_process(build, data, tmp_path, tiny_tokenizer):  # noqa: F811 (the fixture)
    model = build(tmp_path / "model", tiny_tokenizer)
    single = tmp_path / "single"
    assert main([*_argv(model, data, single), "--grad-accum", "2"]) == 0
    out = tmp_path / "fsdp"
    run_qlora([*_argv(model, data, out), "--nproc", "2", "--fsdp"])
    _assert_same_run(out, single)
