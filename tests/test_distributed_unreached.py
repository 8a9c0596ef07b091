"""Multi-process training where a rank's batch does not reach every adapter: equal to one process.

Two models whose adapters a batch can miss: Llama 3.2 Vision (``mllama``), whose cross-attention layers inside the
language model only images reach (text reaches them on no rank; qlora freezes them after the first step), and a
Mixtral with more experts than a step's tokens choose (on transformers 4.x its experts are ``nn.Linear`` layers of
their own, which an unchosen expert leaves without a gradient on one rank while another rank's tokens reach it).
DDP failed the second step ("Expected to have finished reduction in the prior iteration") and FSDP2's flat
all-reduce of the whole LoRA gradients mismatched between ranks (gloo aborted). The runs must equal one process
with the same global batch: per-step loss and gradient norm, and the adapter, its never-reached factors zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli.main import main
from qlora_processes import assert_same_run, run_qlora
from vision_language import build_tiny_vlm

STEPS = 4


def _mixtral(out: Path, tokenizer) -> Path:
    import transformers as tf

    config = tf.MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=64, num_local_experts=8,
                              num_experts_per_tok=1, max_position_embeddings=512, tie_word_embeddings=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unreached") / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}: " + " ".join(f"w{(i * j) % 17}" for j in range(4 + i % 5))})
                            + "\n" for i in range(12)))
    return path


def _argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", str(STEPS),
            "--seq-len", "32", "--lr", "1e-2", "--dropout", "0", "--batch-size", "2", "--no-chunked-ce",
            "--no-progress"]


def _assert_same_run(out: Path, ref: Path) -> None:
    assert_same_run(out, ref, STEPS)


@pytest.mark.parametrize("kind", ["mllama", "mixtral"])
def test_ranks_whose_batches_miss_adapters_equal_one_process(kind, data, tmp_path, tiny_tokenizer):
    model = (build_tiny_vlm(tmp_path / "model", tiny_tokenizer, "mllama") if kind == "mllama"
             else _mixtral(tmp_path / "model", tiny_tokenizer))
    single = tmp_path / "single"
    assert main([*_argv(model, data, single), "--grad-accum", "2"]) == 0
    never = [k for k, v in load_file(str(single / "adapter_model.safetensors")).items()
             if "lora_B" in k and not v.any()]
    if kind == "mllama":  # the cross-attention decoder layer (the tiny model's layer 1): text skips it on every rank
        assert never and all(".language_model.layers.1." in k for k in never)
    for flags in ([], ["--fsdp"]):
        out = tmp_path / ("fsdp" if flags else "ddp")
        run_qlora([*_argv(model, data, out), "--nproc", "2", *flags])
        _assert_same_run(out, single)
