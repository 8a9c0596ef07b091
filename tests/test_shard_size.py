"""``--max-shard-size`` of ``qlora merge`` and ``qlora quantize``: a model larger than the limit is written as
numbered safetensors files with an index, and transformers (+ bitsandbytes for 4-bit) loads them as it loads the
one-file checkpoint: every key mapped, ``total_size`` the bytes of the tensors, nothing missing or unexpected."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qlora.cli.main import main
from qlora.model.tiny import build_tiny_model

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
LIMIT = 40_000  # bytes: the tiny models are ~0.2-0.5 MB, so several files


def _logits(folder) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        return model(IDS).logits.float()


def _check_index(folder) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(folder.glob("model-*.safetensors"))
    assert len(files) > 2 and not (folder / "model.safetensors").exists()
    stored, total = {}, 0
    for f in files:
        with safe_open(f, "pt") as s:
            assert s.metadata() == {"format": "pt"}
            size = 0
            for key in s.keys():
                t = s.get_tensor(key)
                stored[key] = f.name
                size += t.numel() * t.element_size()
            assert size <= LIMIT or len(list(s.keys())) == 1  # a larger tensor alone
            total += size
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_merge_writes_shards_transformers_loads(tmp_path, tiny_tokenizer, arch):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch, tie_word_embeddings=True)
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                          LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    argv = ["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--quant", "none",
            "--dtype", "fp32"]
    assert main([*argv, "--output", str(tmp_path / "one")]) == 0
    assert main([*argv, "--output", str(tmp_path / "shards"), "--max-shard-size", str(LIMIT)]) == 0
    _check_index(tmp_path / "shards")
    torch.testing.assert_close(_logits(tmp_path / "shards"), _logits(tmp_path / "one"), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(_logits(tmp_path / "shards"), peft.merge_and_unload()(IDS).logits)


def test_quantize_writes_shards_transformers_and_bitsandbytes_load(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    argv = ["quantize", "--model", str(base), "--compute-dtype", "fp32"]
    assert main([*argv, "--output", str(tmp_path / "one")]) == 0
    assert main([*argv, "--output", str(tmp_path / "shards"), "--max-shard-size", "40KB"]) == 0
    _check_index(tmp_path / "shards")
    torch.testing.assert_close(_logits(tmp_path / "shards"), _logits(tmp_path / "one"), rtol=0, atol=0)


@pytest.mark.parametrize("size", ["0", "5XB", "-1", "1.5GB", "GB"])
def test_a_bad_size_exits_2_naming_the_option(tmp_path, size, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", str(tmp_path), "--output", str(tmp_path / "q"), "--max-shard-size", size])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--max-shard-size" in err and "5GB" in err and "Traceback" not in err


def test_units_are_transformers_own():
    from transformers.utils.hub import convert_file_size_to_int

    from qlora.shard_size import shard_bytes

    for text in ("5GB", "500MB", "2GiB", "300MiB", "40KB", "7KiB", "12345", "5gb", "5Gb", "40kB"):
        assert shard_bytes(text) == convert_file_size_to_int(text if not text.isdigit() else int(text))
