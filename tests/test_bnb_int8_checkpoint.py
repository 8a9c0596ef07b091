"""bitsandbytes 8-bit checkpoints (saved after ``load_in_8bit=True``) load, decoded to the model's values.

The checkpoints are written by transformers + bitsandbytes (CPU backend) themselves; the oracle is
transformers' own load of them followed by ``dequantize()`` (bitsandbytes' ``int8_vectorwise_dequant``),
and, independently, the format's definition ``w = code * SCB / 127`` per output row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.errors import UsageError
from qlora.model.load import load_model
from qlora.model.tiny import build_tiny_model
from test_stored_floats import _IDS, _assert_same_4bit, _save_dense, assert_same_tensors, with_tensors

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def write_int8(base: Path, out: Path, tokenizer, skip: list[str] | None = None) -> Path:
    """``base`` quantized to 8 bits and saved by transformers + bitsandbytes."""
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu",
                                                              dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _dequantized(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32)
    model.dequantize()
    return model.eval()


def _load16(path: Path):
    return load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")[0]


@pytest.mark.parametrize("arch, skip", [("llama", None), ("qwen2", ["lm_head", "down_proj"]), ("gpt2", None)])
def test_int8_checkpoint_loads_as_bitsandbytes_dequantizes_it(arch, skip, tmp_path, tiny_tokenizer):
    """Llama; Qwen2 (biases) with MLP down projections kept 16-bit; GPT-2, whose Conv1D layers
    bitsandbytes stores as [out, in] linear weights."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    path = write_int8(base, tmp_path / "int8", tiny_tokenizer, skip)
    stored = load_file(path / "model.safetensors")
    assert any(k.endswith(".SCB") for k in stored) and any(t.dtype == torch.int8 for t in stored.values())
    ours, ref = _load16(path), _dequantized(path)
    theirs = ref.state_dict()
    if arch == "gpt2":  # transformers' dequantize leaves nn.Linear [out, in] where GPT-2 has Conv1D [in, out]
        theirs = {k: t.t() if stored.get(k, t).dtype == torch.int8 else t for k, t in theirs.items()}
    assert_same_tensors(ours.state_dict(), theirs)
    with torch.no_grad():
        assert torch.equal(ours(_IDS).logits, ref(_IDS).logits)
    for key, codes in stored.items():  # the format's definition, written out
        if codes.dtype == torch.int8:
            scb = stored[key[: -len("weight")] + "SCB"]
            want = codes.float() * scb.unsqueeze(1) / 127
            got = ours.state_dict()[key]
            got = got.t() if arch == "gpt2" else got
            torch.testing.assert_close(got, want, rtol=2e-7, atol=0)
    if skip:
        assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32


def test_int8_sharded_scales_and_4bit_load(tmp_path, tiny_tokenizer):
    """Row scales in a later shard than their codes are waited for; the 4-bit load quantizes the decoded
    weights as it quantizes them saved in 32 bits."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    path = write_int8(base, tmp_path / "int8", tiny_tokenizer)
    stored = load_file(path / "model.safetensors")
    sharded = tmp_path / "sharded"
    shutil.copytree(path, sharded)
    (sharded / "model.safetensors").unlink()
    first = {k: v for k, v in stored.items() if not k.endswith(("SCB", "weight_format"))}
    second = {k: v for k, v in stored.items() if k not in first}
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    for tensors, name in zip((first, second), names):
        save_file(tensors, sharded / name, metadata={"format": "pt"})
    weight_map = {k: names[0] for k in first} | {k: names[1] for k in second}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ours = _load16(sharded)
    assert_same_tensors(ours.state_dict(), _load16(path).state_dict())
    _assert_same_4bit(sharded, _save_dense(ours, sharded, tmp_path / "dense"))


def test_broken_int8_checkpoints_are_named(tmp_path, tiny_tokenizer):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    path = write_int8(base, tmp_path / "int8", tiny_tokenizer)
    stored = load_file(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    no_scale = with_tensors(path, tmp_path / "no-scale",
                            {k: v for k, v in stored.items() if not k.endswith("q_proj.SCB")})
    with pytest.raises(UsageError, match=rf"8-bit weight {key} is stored as .*, which lacks its row scales"):
        _load16(no_scale)
    codes_only = with_tensors(path, tmp_path / "codes-only",
                              {k: v for k, v in stored.items()
                               if not k.startswith(key[:-6] + "SCB") and k != key + "_format"})
    with pytest.raises(UsageError, match=rf"tensor {key} is stored as int8 codes without its row scales"):
        _load16(codes_only)
    orphan = with_tensors(path, tmp_path / "orphan", {k: v for k, v in stored.items() if k != key})
    with pytest.raises(UsageError, match=rf"8-bit weight {key} is stored as .*, which lacks its codes"):
        _load16(orphan)
    turing = with_tensors(path, tmp_path / "turing", stored | {key + "_format": torch.tensor(2, dtype=torch.uint8)})
    with pytest.raises(UsageError, match=rf"{key}_format is 2, a GPU tile layout"):
        _load16(turing)
