"""4-bit checkpoints as transformers + bitsandbytes write them, in every variant users bring.

The oracle is transformers with bitsandbytes (CPU backend): the checkpoints are written by its
``save_pretrained``, the logits qlora must reproduce are its own, and the files qlora writes
must load there (and hold the bytes it would have written itself).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import qlora
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.tiny import build_tiny_model
from qlora.nn import Linear4bit

from bnb_oracle import reference_path

pytest.importorskip("bitsandbytes")

_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])


def _bnb_checkpoint(base, out, tokenizer, compute=torch.float32, **bnb_kwargs):
    """``out``: ``base`` quantized and saved by transformers + bitsandbytes; returns its model too."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, **bnb_kwargs)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=compute)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


# Oracle loads pass dtype="auto" (the config's dtype, transformers 5's default): transformers 4.x + bitsandbytes
# would load in float16 otherwise.
def _logits(model) -> torch.Tensor:
    reference_path(model)
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("arch, quant_type, double_quant, compute, storage", [
    ("llama", "fp4", False, torch.float16, torch.bfloat16),
    ("qwen2", "nf4", True, torch.bfloat16, torch.float32),  # biases
    ("phi3", "fp4", True, torch.float32, torch.float16),  # fused qkv / gate_up
    ("gemma3", "nf4", False, torch.float32, torch.bfloat16),
    ("gpt2", "nf4", True, torch.float16, torch.float32),  # Conv1D, [in, out] weights
])
def test_every_quant_variant_loads_with_transformers_logits(tmp_path, tiny_tokenizer, arch, quant_type,
                                                            double_quant, compute, storage):
    """quant type x double quant x compute dtype x quant_storage (FSDP-QLoRA files keep the packed
    bytes in bf16/fp32 tensors): qlora reproduces transformers + bitsandbytes' logits exactly."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    theirs = _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, compute, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=storage)
    ours, _ = qlora.load_model(tmp_path / "q", compute_dtype=compute, device="cpu")
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == sum(
        type(m).__name__ == "Linear4bit" for m in theirs.modules())
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
def test_non_uint8_storage_resaves_as_transformers_own_uint8_checkpoint(tmp_path, tiny_tokenizer, storage):
    """A checkpoint whose packed weights are stored as bf16/fp16/fp32 elements, loaded and saved
    again, is byte for byte the uint8 checkpoint transformers writes for the same model."""
    from safetensors.torch import load_file

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    kwargs = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    _bnb_checkpoint(base, tmp_path / "stored", tiny_tokenizer, bnb_4bit_quant_storage=storage, **kwargs)
    _bnb_checkpoint(base, tmp_path / "uint8", tiny_tokenizer, bnb_4bit_quant_storage=torch.uint8, **kwargs)
    model, tok = qlora.load_model(tmp_path / "stored", compute_dtype=torch.float32, device="cpu")
    for m in model.modules():
        if isinstance(m, Linear4bit):
            assert m.weight.shape == ((m.in_features * m.out_features + 1) // 2, 1)
    qlora.save_quantized(model, tmp_path / "resaved", tokenizer=tok)
    ours = load_file(tmp_path / "resaved" / "model.safetensors")
    reference = load_file(tmp_path / "uint8" / "model.safetensors")
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert torch.equal(ours[key].view(torch.uint8), value.view(torch.uint8)), key


def test_checkpoint_with_quantized_head_round_trips_through_transformers(tmp_path, tiny_tokenizer):
    """``llm_int8_skip_modules=[]`` makes bitsandbytes pack the output head too; re-saved by qlora,
    the file must say so, or transformers keeps the head dense and fails on its shape."""
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="qwen2")
    theirs = _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, llm_int8_skip_modules=[])
    assert type(theirs.lm_head).__name__ == "Linear4bit"
    ours, tok = qlora.load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    assert isinstance(ours.lm_head, Linear4bit)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)
    qlora.save_quantized(ours, tmp_path / "resaved", tokenizer=tok)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", device_map="cpu", dtype="auto")
    assert type(again.lm_head).__name__ == "Linear4bit"
    torch.testing.assert_close(_logits(again), _logits(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("arch, skip", [("gpt2", ["c_fc"]), ("llama", ["down_proj", "lm_head"])])
def test_checkpoint_with_dense_layers_resaves_naming_them(tmp_path, tiny_tokenizer, arch, skip):
    """``llm_int8_skip_modules`` leaves layers dense (GPT-2's are ``Conv1D``, not ``nn.Linear``); loaded
    by qlora and re-saved, the file names them again, or transformers builds them 4-bit and fails on
    their dense weights."""
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    theirs = _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, llm_int8_skip_modules=skip)
    four_bit = sorted(n for n, m in theirs.named_modules() if type(m).__name__ == "Linear4bit")
    ours, tok = qlora.load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    assert sorted(n for n, m in ours.named_modules() if isinstance(m, Linear4bit)) == four_bit
    qlora.save_quantized(ours, tmp_path / "resaved", tokenizer=tok)
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert sorted(qc["llm_int8_skip_modules"]) == sorted(skip)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", device_map="cpu", dtype="auto")
    assert sorted(n for n, m in again.named_modules() if type(m).__name__ == "Linear4bit") == four_bit
    torch.testing.assert_close(_logits(again), _logits(theirs), rtol=0, atol=0)


def _with_quantization_config(src, out, qc: dict):
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_other_quantized_checkpoints_are_refused_with_what_to_do(tmp_path, tiny_tokenizer, capsys):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    cases = {
        _with_quantization_config(base, tmp_path / "bnb", {"quant_method": "bitsandbytes"}): "neither load_in_4bit",
        _with_quantization_config(base, tmp_path / "hqq", {"quant_method": "hqq", "nbits": 4}): "'hqq'",
        _with_quantization_config(base, tmp_path / "eetq", {"quant_method": "eetq"}): "'eetq'",
    }
    for folder, kind in cases.items():
        with pytest.raises(UsageError) as err:
            qlora.load_model(folder, device="cpu")
        message = str(err.value)
        assert str(folder / "config.json") in message and kind in message and "original 16/32-bit" in message
        assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
        captured = capsys.readouterr()
        assert str(folder / "config.json") in captured.err and "Traceback" not in captured.err


class _QuantizedTensorStandIn:
    """What torchao's pickles hold in place of tensors (its tensor subclasses): objects ``weights_only`` refuses."""


def test_a_refused_format_is_named_before_its_pickled_weights_are_opened(tmp_path, tiny_tokenizer, capsys):
    """torchao checkpoints are saved as pytorch_model.bin holding its tensor subclasses; the refusal must name the
    format from config.json, not send the user to re-save pickles that would be torchao's again."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    folder = _with_quantization_config(base, tmp_path / "torchao", {
        "quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_data": {}}}})
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _QuantizedTensorStandIn()}, folder / "pytorch_model.bin")
    with pytest.raises(UsageError) as err:
        qlora.load_model(folder, device="cpu")
    assert str(folder / "config.json") in str(err.value) and "'torchao'" in str(err.value)
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    captured = capsys.readouterr()
    assert "'torchao'" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("arch, quant_type, double_quant, blocksize, compute", [
    ("llama", "nf4", True, 64, "fp32"),
    ("qwen2", "fp4", False, 64, "fp16"),
    ("gpt2", "nf4", True, 64, "bf16"),
    ("phi3", "fp4", True, 32, "fp32"),
    ("llama", "nf4", False, 4096, "fp16"),
])
def test_quantize_command_options_load_in_transformers(tmp_path, tiny_tokenizer, arch, quant_type, double_quant,
                                                       blocksize, compute):
    """`qlora quantize` under each of its options: transformers + bitsandbytes loads the folder with
    the logits of qlora's own 4-bit model and, at its one block size (64), the folder equals its own
    quantization of the original model: same logits, the quantized tensors byte for byte."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute]
    # A checkpoint in the compute dtype, as real ones are: transformers casts the weights to the load
    # dtype before quantizing, qlora quantizes the checkpoint's own values.
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch, dtype=dtype)
    argv = ["quantize", "--model", str(base), "--output", str(tmp_path / "q"), "--quant", quant_type,
            "--blocksize", str(blocksize), "--compute-dtype", compute]
    assert main([*argv, "--double-quant" if double_quant else "--no-double-quant"]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_compute_dtype"]) == (
        quant_type, double_quant, str(dtype).removeprefix("torch."))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype="auto")
    ours, _ = qlora.load_model(base, quant=quant_type, double_quant=double_quant, blocksize=blocksize,
                               compute_dtype=dtype, device="cpu")
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=0)
    again, _ = qlora.load_model(tmp_path / "q", compute_dtype=dtype, device="cpu")
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)
    if blocksize == 64:
        direct = _bnb_checkpoint(base, tmp_path / "direct", tiny_tokenizer, dtype, bnb_4bit_quant_type=quant_type,
                                 bnb_4bit_use_double_quant=double_quant)
        torch.testing.assert_close(_logits(theirs), _logits(direct), rtol=0, atol=0)
        mine, reference = load_file(tmp_path / "q" / "model.safetensors"), load_file(
            tmp_path / "direct" / "model.safetensors")
        assert sorted(mine) == sorted(reference)
        packed = [k for k in reference if ".weight." in k or k + ".absmax" in reference]
        assert packed and all(torch.equal(mine[k], reference[k]) for k in packed)
        # config.json as transformers writes it (no local path of the base); only the skipped layers are
        # listed where transformers leaves None (read there as: skip the output head, the same layers)
        written, own = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("q", "direct"))
        assert written["quantization_config"].pop("llm_int8_skip_modules") == ["lm_head"]
        assert own["quantization_config"].pop("llm_int8_skip_modules") is None
        # transformers 5 writes rope_parameters alone; the file has 4.x's key too
        if "rope_parameters" in own and "rope_theta" not in own:
            assert written.pop("rope_theta") == own["rope_parameters"]["rope_theta"]
        assert written == own


def test_quantize_refuses_a_4bit_checkpoint_in_another_format_and_resaves_its_own(tmp_path, tiny_tokenizer, capsys):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    theirs = _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="fp4",
                             bnb_4bit_use_double_quant=False)
    assert main(["quantize", "--model", str(tmp_path / "q"), "--output", str(tmp_path / "nf4")]) == 2
    err = capsys.readouterr().err
    assert "fp4, no double quantization, block size 64" in err and "Traceback" not in err
    assert not (tmp_path / "nf4").exists()
    assert main(["quantize", "--model", str(tmp_path / "q"), "--output", str(tmp_path / "same"), "--quant", "fp4",
                 "--no-double-quant", "--compute-dtype", "fp32"]) == 0
    assert "is a bitsandbytes fp4 checkpoint already: re-saved as it is" in capsys.readouterr().out
    assert main(["quantize", "--model", str(base), "--output", str(tmp_path / "fresh"), "--quant", "fp4"]) == 0
    out = capsys.readouterr().out
    assert "wrote fp4 checkpoint of" in out and "already" not in out
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    mine, reference = (load_file(tmp_path / d / "model.safetensors") for d in ("same", "q"))
    assert sorted(mine) == sorted(reference) and all(torch.equal(mine[k], reference[k]) for k in reference)

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "same", device_map="cpu", dtype="auto")
    torch.testing.assert_close(_logits(again), _logits(theirs), rtol=0, atol=0)


def test_config_naming_4bit_over_dense_weights_quantizes_as_it_names(tmp_path, tiny_tokenizer):
    """A 16/32-bit checkpoint whose config.json carries a bitsandbytes 4-bit quantization_config (kept
    over a dense save): quantized while loading in that format, as transformers + bitsandbytes
    quantizes it when given that config, not loaded dense."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="qwen2")
    theirs = _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="fp4",
                             bnb_4bit_use_double_quant=True)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    del config["quantization_config"]["bnb_4bit_quant_type"]  # fp4, BitsAndBytesConfig's default, when unsaid
    (base / "config.json").write_text(json.dumps(config))
    ours, _ = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    layers = [m for m in ours.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and {(m.quant_type, m.double_quant) for m in layers} == {("fp4", True)}
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("arch, storage", [("phi3", torch.bfloat16), ("gpt2", torch.float32)])
def test_adapter_on_a_bnb_checkpoint_loads_in_peft_on_transformers_bnb(tmp_path, tiny_tokenizer, arch, storage):
    """An adapter made on a transformers + bitsandbytes checkpoint (fused qkv / Conv1D layers, packed
    bytes in float tensors) gives the same logits under PEFT on that checkpoint loaded by transformers."""
    from peft import PeftModel
    from random_adapters import randomize_lora_b
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_quant_storage=storage)
    ours, _ = qlora.load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=4, alpha=8, dropout=0.0)
    randomize_lora_b(ours, seed=0)
    qlora.save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu",
                                                                            dtype="auto"),
                                       tmp_path / "adapter")
    try:
        expected = _logits(theirs)
    except RuntimeError as exc:  # transformers 4.x runs a reloaded bfloat16-storage file of its own with a wrong shape
        if _V5:
            raise
        pytest.skip(f"transformers {__import__('transformers').__version__} cannot run its own reloaded file: {exc}")
    with theirs.disable_adapter():
        assert (expected - _logits(theirs)).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-5)


def test_format_is_read_from_each_layers_quant_state(tmp_path, tiny_tokenizer):
    """bitsandbytes decodes each layer from its own quant state: a config.json without
    bnb_4bit_quant_type / bnb_4bit_use_double_quant (older or hand-written ones) loads the same."""
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["quantization_config"]["bnb_4bit_quant_type"], config["quantization_config"]["bnb_4bit_use_double_quant"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    try:
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype="auto")
    except ValueError as exc:  # transformers 4.x takes the format from config.json, so fails on its own file
        pytest.skip(f"transformers {__import__('transformers').__version__} cannot load this file itself: {exc}")
    ours, tok = qlora.load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    assert {(m.quant_type, m.double_quant) for m in ours.modules() if isinstance(m, Linear4bit)} == {("nf4", True)}
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)
    qlora.save_quantized(ours, tmp_path / "resaved", tokenizer=tok)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", device_map="cpu", dtype="auto")
    torch.testing.assert_close(_logits(again), _logits(theirs), rtol=0, atol=0)


@pytest.mark.parametrize("missing", [".absmax", "", ".quant_state.bitsandbytes__nf4", ".nested_absmax",
                                     ".absmax .quant_map .nested_absmax .nested_quant_map .quant_state.bitsandbytes__nf4"])
def test_incomplete_4bit_layers_are_named_not_misread(tmp_path, tiny_tokenizer, missing):
    """A 4-bit layer with part of its quant state gone: one message naming the layer, never a
    traceback, and never a load that decodes 8-bit absmax codes as if they were the constants."""
    from safetensors.torch import load_file, save_file

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    file = tmp_path / "q" / "model.safetensors"
    tensors = load_file(file)
    for suffix in missing.split(" "):
        del tensors["model.layers.1.mlp.up_proj.weight" + suffix]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"model\.layers\.1\.mlp\.up_proj"):
        qlora.load_model(tmp_path / "q", device="cpu")


def test_weights_of_another_config_are_refused_by_shape(tmp_path, tiny_tokenizer, capsys):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="qwen2")
    other = build_tiny_model(tmp_path / "other", tokenizer=tiny_tokenizer, arch="qwen2", intermediate_size=96)
    shutil.copy(other / "config.json", base / "config.json")
    assert main(["generate", "--model", str(base), "--prompt", "hi", "--max-new-tokens", "1", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp" in err and "expects (" in err and "Traceback" not in err


def test_train_generate_merge_from_a_bf16_storage_checkpoint(tmp_path, tiny_tokenizer, capsys):
    """The CLI on an FSDP-QLoRA-style checkpoint (packed bytes in bf16 tensors, fp16 compute): train
    an adapter, generate with it, merge it; the merged 16-bit model is the 4-bit one plus the adapter."""
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="mistral")
    _bnb_checkpoint(base, tmp_path / "q", tiny_tokenizer, torch.float16, bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage=torch.bfloat16)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the fox jumps over {i} lazy dogs."}) + "\n" for i in range(16)))
    q, run = str(tmp_path / "q"), str(tmp_path / "run")
    assert main(["train", "--model", q, "--data", str(data), "--output", run, "--seq-len", "32", "--batch-size", "4",
                 "--lr", "1e-2", "--max-steps", "3", "--no-progress"]) == 0
    assert main(["generate", "--model", q, "--adapter", run, "--prompt", "the fox", "--max-new-tokens", "3"]) == 0
    assert main(["merge", "--model", q, "--adapter", run, "--output", str(tmp_path / "merged"), "--dtype",
                 "float32"]) == 0
    capsys.readouterr()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ours, _ = qlora.load_model(q, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, run)
    torch.testing.assert_close(_logits(merged), _logits(ours), rtol=1e-4, atol=1e-4)


def test_falcon_checkpoint_transformers_wrote_loads_as_transformers_loads_it(tmp_path, tiny_tokenizer):
    """transformers 5 + bitsandbytes packs exact nn.Linear layers only: its 4-bit Falcon file keeps every
    FalconLinear 16-bit (4.x packs them too), and qlora loads that file as transformers does: 4-bit exactly
    where transformers holds bitsandbytes layers, not quantizing the others itself."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_kv_heads=2, new_decoder_architecture=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    theirs = _bnb_checkpoint(tmp_path / "base", tmp_path / "q", tiny_tokenizer, bnb_4bit_quant_type="nf4")
    ours, _ = qlora.load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    assert {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)} == {
        n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=0)


def test_quantize_refuses_linear_subclasses_transformers_keeps_dense(tmp_path, tiny_tokenizer, capsys):
    """qlora quantizes FalconLinear while loading, but transformers + bitsandbytes would keep it 16-bit
    and fail on a file holding it packed: `qlora quantize` says so instead of writing that file."""
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    assert main(["quantize", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "FalconLinear" in err and "Traceback" not in err and not (tmp_path / "q").exists()


def test_quantize_refuses_layers_the_checkpoint_stores_fused(tmp_path, tiny_tokenizer, capsys):
    """HRM's checkpoint stores ``gqkv_proj`` and ``gate_up_proj`` whole, and transformers splits them into
    separate linear layers when it loads the model. 4-bit codes of the split layers cannot be joined back
    into the fused tensor's, so no 4-bit file of them loads (transformers + bitsandbytes fails on one):
    `qlora quantize` says so instead of writing it, and the 16-bit model loads in 4 bits as the message says."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    if "hrm_text" not in CONFIG_MAPPING:
        pytest.skip("this transformers has no 'hrm_text' model (added in transformers 5)")
    config = AutoConfig.for_model("hrm_text", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, head_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    assert main(["quantize", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "fused" in err and "self_attn.q_proj.weight" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
    model, _ = qlora.load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")
    assert isinstance(model.model.L_module.layers[0].self_attn.q_proj, Linear4bit)
