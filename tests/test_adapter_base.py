"""An adapter knows its base: the 4-bit format it was trained on is recorded beside it and is what the
commands load by default, and an adapter folder given as --model brings its base (as PEFT reads it)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qlora.cli.main import main
from qlora.model.adapter_io import load_adapter, save_adapter
from qlora.model.inject import add_lora
from qlora.model.load import load_model
from qlora.model.merge import merge
from random_adapters import randomize_lora_b

FP4_128 = {"quant": "fp4", "blocksize": 128, "double_quant": False}


@pytest.fixture(scope="module")
def fp4_adapter(tmp_path_factory, tiny_model_dir):
    """An adapter trained (non-zero B) on an FP4, block-128, single-quantized base."""
    model, tok = load_model(tiny_model_dir, quant="fp4", blocksize=128, double_quant=False,
                            compute_dtype=torch.float32, device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    randomize_lora_b(model, seed=1)
    return save_adapter(model, tmp_path_factory.mktemp("fp4-adapter") / "adapter", tokenizer=tok)


def test_the_base_format_is_recorded_beside_the_adapter(fp4_adapter):
    info = json.loads((fp4_adapter / "qlora_adapter.json").read_text())
    assert info["base_quantization"] == FP4_128
    assert "base_quantization" not in json.loads((fp4_adapter / "adapter_config.json").read_text())  # PEFT's file


def test_merge_of_the_adapter_folder_folds_into_the_base_it_was_trained_on(fp4_adapter, tiny_model_dir, tmp_path,
                                                                          capsys):
    assert main(["merge", "--model", str(fp4_adapter), "--output", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert "is a LoRA adapter: loading its base" in capsys.readouterr().err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    expected = {}
    for kwargs in (FP4_128, {"quant": "nf4", "blocksize": 64, "double_quant": True}):
        model, _ = load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu", **kwargs)
        load_adapter(model, fp4_adapter)
        merge(model, into="dequantized", dtype=torch.float32)
        expected[kwargs["quant"]] = model.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[key], expected["fp4"][key])
    assert not torch.allclose(merged[key], expected["nf4"][key], atol=1e-3)  # the old default base was another


def test_generate_with_the_adapter_folder_as_model_equals_base_plus_adapter(fp4_adapter, tiny_model_dir, capsys):
    common = ["--prompt", "the quick", "--max-new-tokens", "6", "--temperature", "0", "--compute-dtype", "fp32",
              "--template", "none"]
    assert main(["generate", "--model", str(fp4_adapter), *common]) == 0
    via_folder = capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(fp4_adapter), "--quant", "fp4",
                 *common]) == 0
    assert capsys.readouterr().out == via_folder
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(fp4_adapter), "--quant", "nf4",
                 *common]) == 0
    assert "was trained on a fp4 (block 128, no double quantization) base; loading nf4" in capsys.readouterr().err


def test_train_continues_an_adapter_folder_on_its_base_and_format(fp4_adapter, tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) for i in range(4)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(fp4_adapter), "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--no-progress"]) == 0
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"], config["adapter"]) == (str(tiny_model_dir), str(fp4_adapter))
    assert {k: config[k] for k in FP4_128} == FP4_128
    assert json.loads((out / "qlora_adapter.json").read_text())["base_quantization"] == FP4_128


def test_train_with_only_an_adapter_takes_the_base_it_names(fp4_adapter, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) for i in range(4)))
    out = tmp_path / "run"
    assert main(["train", "--adapter", str(fp4_adapter), "--data", str(data), "--output", str(out), "--max-steps",
                 "1", "--no-progress"]) == 0
    assert f"on the base its adapter_config.json names, {tiny_model_dir}" in capsys.readouterr().err
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["model"], config["adapter"]) == (str(tiny_model_dir), str(fp4_adapter))
    assert {k: config[k] for k in FP4_128} == FP4_128


def test_train_with_only_an_adapter_that_is_no_local_folder_says_why_model_is_needed(tmp_path, capsys):
    """--adapter alone takes its base from the folder's adapter_config.json: where there is no such folder (a hub id,
    a mistyped path) the error names the --adapter path and why no base was found, not only "--model is required"."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hi"}) + "\n")
    for adapter in (str(tmp_path / "no-such-adapter"), "some-org/some-adapter"):
        assert main(["train", "--adapter", adapter, "--data", str(data), "--output", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        if adapter.startswith("/"):  # a mistyped path: refused as such before anything loads
            assert f"--adapter {adapter}" in err and "does not exist" in err and "adapter folder" in err, err
        else:  # a hub id: qlora loads no adapter from the hub, with or without --model; it says how to get it
            assert f"--adapter {adapter}" in err and f"hf download {adapter} --local-dir DIR" in err, err


def test_an_adapter_folder_that_names_no_base_is_refused(fp4_adapter, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((fp4_adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(config))
    data = tmp_path / "x.jsonl"  # readable: eval checks its data before the model
    data.write_text(json.dumps({"text": "Hello"}) + "\n")
    assert main(["eval", "--model", str(bare), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA adapter, not a model" in err and "base_model_name_or_path" in err and "Traceback" not in err
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (bare / "adapter_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(bare), "--prompt", "x"]) == 2
    assert "names the base model" in capsys.readouterr().err


def test_an_adapter_without_a_record_loads_on_the_default_nf4_base(fp4_adapter, tmp_path):
    """PEFT's adapters (no qlora_adapter.json) keep the QLoRA default."""
    import argparse

    from qlora.cli.base_model import resolve_base

    peft_like = tmp_path / "peft"
    peft_like.mkdir()
    (peft_like / "adapter_config.json").write_text((fp4_adapter / "adapter_config.json").read_text())
    args = argparse.Namespace(model="base", adapter=[str(peft_like)], quant=None)
    resolve_base(args, "generate")
    assert (args.quant, args.blocksize, args.double_quant) == ("nf4", 64, True)
    args = argparse.Namespace(model="base", adapter=None, quant=None)
    resolve_base(args, "export")
    assert args.quant == "none"


def test_eval_and_generate_with_only_an_adapter_load_the_base_it_names(fp4_adapter, tiny_model_dir, tmp_path, capsys):
    """The README's `qlora eval --adapter out --data held-out.jsonl`: --adapter alone takes its base from the
    folder's adapter_config.json (as train does, and PEFT's AutoPeftModelForCausalLM), in its trained format."""
    data = tmp_path / "held-out.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) for i in range(3)))
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(fp4_adapter), "--data", str(data),
                 "--json"]) == 0
    with_model = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(fp4_adapter), "--data", str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["loss"] == with_model["loss"]
    assert f"no --model: loading the base {fp4_adapter}'s adapter_config.json names, {tiny_model_dir}" in err, err
    common = ["--prompt", "the quick", "--max-new-tokens", "6", "--temperature", "0", "--template", "none"]
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(fp4_adapter), *common]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", "--adapter", str(fp4_adapter), *common]) == 0
    assert capsys.readouterr().out == expected


def test_merge_with_only_an_adapter_folds_it_into_the_base_it_names(fp4_adapter, tmp_path, capsys):
    assert main(["merge", "--model", str(fp4_adapter), "--output", str(tmp_path / "a"), "--dtype", "float32"]) == 0
    assert main(["merge", "--adapter", str(fp4_adapter), "--output", str(tmp_path / "b"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_file(tmp_path / "a" / "model.safetensors")[key],
                       load_file(tmp_path / "b" / "model.safetensors")[key])


@pytest.mark.parametrize("command", ["eval", "merge", "generate", "chat", "serve", "export"])
def test_without_model_or_an_adapter_folder_naming_its_base_the_error_says_what_is_needed(command, tiny_model_dir,
                                                                                        tmp_path, capsys):
    extra = {"eval": ["--data", str(tmp_path / "d.jsonl")], "merge": ["--output", str(tmp_path / "m")],
             "generate": ["--prompt", "hi"], "export": ["--output", str(tmp_path / "g")]}.get(command, [])
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    assert main([command, *extra]) == 2
    err = capsys.readouterr().err
    assert "--model is required" in err and "--adapter" in err and "Traceback" not in err, err
    both = tmp_path / "model-and-adapter"  # a model folder (config.json) is no adapter whose config names a base
    both.mkdir()
    (both / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (both / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    assert main([command, "--adapter", str(both), *extra]) == 2
    err = capsys.readouterr().err
    assert "--model is required" in err and f"--adapter {both}" in err and "Traceback" not in err, err
