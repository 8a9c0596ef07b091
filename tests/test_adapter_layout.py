"""Adapters trained under transformers 4, whose keys name the checkpoint layout (Mixtral's
``block_sparse_moe.experts.3.w1``, Qwen2-MoE's ``mlp.experts.3.gate_proj``, a vision-language model's
``language_model.model.layers`` before transformers 4.52), load on transformers 5's fused 3-D experts and renamed
modules as the model they were trained on.

The oracle needs neither PEFT nor qlora's conversion: the adapter's deltas ``s B A`` added to the per-expert
weights of the checkpoint file (the layout they were trained in), loaded by transformers. PEFT 0.21, which converts
such adapters too, is a second oracle where it can (Mixtral with w1 and w3 both adapted at one rank); it refuses w1
without w3 and gets Qwen2-MoE's wrong.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.load import load_model
from tiny_moe import tiny_moe_factory

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
_FUSES_EXPERTS = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers.conversion_mapping") is None,
    reason="transformers 4.x builds the per-expert layers themselves: nothing to convert")

_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    return tiny_moe_factory(tmp_path_factory, tiny_tokenizer)


def _checkpoint(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _v4_adapter(model_dir, out, leaves, r=2, alpha=4.0, rank_pattern=None, alpha_pattern=None, rslora=False,
                dropout=0.0):
    """An adapter as PEFT saves it under transformers 4.x (LoRA on the checkpoint's own 2-D layers named by
    ``leaves``), random non-zero factors; returns the per-layer deltas ``s B A`` by checkpoint weight key."""
    from safetensors.torch import save_file

    from qlora.model.inject import pattern_key

    rank_pattern, alpha_pattern = rank_pattern or {}, alpha_pattern or {}
    g = torch.Generator().manual_seed(0)
    tensors, deltas = {}, {}
    for key, weight in _checkpoint(model_dir).items():
        path = key.removesuffix(".weight")
        if weight.dim() != 2 or not key.endswith(".weight") or path.rsplit(".", 1)[-1] not in leaves:
            continue
        own_r = rank_pattern[k] if (k := pattern_key(rank_pattern, path)) is not None else r
        own_alpha = alpha_pattern[k] if (k := pattern_key(alpha_pattern, path)) is not None else alpha
        a = 0.3 * torch.randn(own_r, weight.shape[1], generator=g)
        b = 0.3 * torch.randn(weight.shape[0], own_r, generator=g)
        tensors[f"base_model.model.{path}.lora_A.weight"], tensors[f"base_model.model.{path}.lora_B.weight"] = a, b
        deltas[key] = own_alpha / (math.sqrt(own_r) if rslora else own_r) * b @ a
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=sorted(leaves), use_rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        bias="none", base_model_name_or_path=str(model_dir))))
    return deltas


def _trained_model(model_dir, deltas, out):
    """transformers' model of the checkpoint with the deltas added in its own layout: what the adapter computed."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    weights = _checkpoint(model_dir)
    save_file({k: v + deltas.get(k, 0) for k, v in weights.items()}, str(out / "model.safetensors"))
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(_IDS).logits


CASES = {  # model type, adapted checkpoint layers, options
    "mixtral": ("mixtral", {"q_proj", "w1", "w2", "w3"}, {}),
    "mixtral_patterns_rslora": ("mixtral", {"v_proj", "w1", "w2", "w3"},
                                dict(rank_pattern={"w3": 3, r"layers\.1\..*w2": 4}, alpha_pattern={"w1": 6.0},
                                     rslora=True, dropout=0.05)),
    "mixtral_w1_alone": ("mixtral", {"w1"}, {}),  # (PEFT refuses it: w3 is fused with it)
    "qwen2_moe": ("qwen2_moe", {"q_proj", "gate_proj", "up_proj", "down_proj"}, {}),  # shared expert's too
}


@_FUSES_EXPERTS
@pytest.mark.parametrize("case", sorted(CASES))
def test_per_expert_adapter_loads_saves_and_merges_as_trained(tmp_path, saved, case):
    from peft import PeftModel

    model_type, leaves, options = CASES[case]
    model_dir = saved(model_type)
    deltas = _v4_adapter(model_dir, tmp_path / "v4", leaves, **options)
    expected = _logits(_trained_model(model_dir, deltas, tmp_path / "trained"))

    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "v4")
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-4, atol=1e-4)
    if case == "mixtral":  # PEFT converts this one as well
        theirs = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32), tmp_path / "v4").eval()
        torch.testing.assert_close(_logits(theirs), expected, rtol=1e-4, atol=1e-4)
    # written back in the model's layout (target_parameters), PEFT reads it on transformers 5 as trained
    qlora.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["target_parameters"] and not {"w1", "w2", "w3"} & set(written["target_modules"])  # (Qwen2-MoE's
    # shared expert keeps gate_proj, up_proj and down_proj layers)
    again = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-4, atol=1e-4)
    qlora.merge(ours, dtype=torch.float32)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-4, atol=1e-4)

    # on the 4-bit base: PEFT's outputs for the adapter written back, on the dequantized weights
    from test_moe_expert_lora import _dequantized_reference

    four, _ = load_model(model_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(four, tmp_path / "v4")
    theirs = PeftModel.from_pretrained(_dequantized_reference(model_dir, four), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(four), _logits(theirs), rtol=1e-4, atol=1e-4)


@_FUSES_EXPERTS
@pytest.mark.parametrize("model_type,options", [("mixtral", {}),
                                               ("mixtral", dict(rank_pattern={r"layers\.1\..*gate": 3}, dropout=0.05)),
                                               ("phimoe", {})])
def test_linear_router_lora_lands_on_the_router_weight_as_trained(tmp_path, saved, model_type, options):
    """transformers 4.x's Mixtral router was a linear layer an all-linear adapter adapted; transformers 5's router
    is no linear layer: its LoRA becomes LoRA on the router's 2-D weight (target_parameters), as trained, which
    qlora trains on, writes back for PEFT and merges (a refusal naming the router before)."""
    from peft import PeftModel

    model_dir = saved(model_type)
    deltas = _v4_adapter(model_dir, tmp_path / "v4", {"q_proj", "gate", "w1", "w3"}, **options)
    expected = _logits(_trained_model(model_dir, deltas, tmp_path / "trained"))
    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "v4")
    router = "router" if model_type == "phimoe" else "gate"  # PhiMoE's: an nn.Linear that also picks the experts
    assert type(ours.model.layers[1].mlp.get_submodule(router)).__name__ == "RouterLora"
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-4, atol=1e-4)
    qlora.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "gate" not in written["target_modules"] and f"model.layers.0.mlp.{router}.weight" in written[
        "target_parameters"]
    again = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-4, atol=1e-4)
    qlora.merge(ours, dtype=torch.float32)
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-4, atol=1e-4)


@_FUSES_EXPERTS
def test_dora_on_per_expert_layers_is_refused_naming_the_layer(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    model_dir = saved("mixtral")
    _v4_adapter(model_dir, tmp_path / "v4", {"w2"})
    file = tmp_path / "v4" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.0.block_sparse_moe.experts.1.w2"
    save_file(tensors | {f"{key}.lora_magnitude_vector": torch.ones(32)}, str(file))
    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"adapts model\.layers\.0\.block_sparse_moe\.experts\.1\.w2 with "
                                         r"lora_magnitude_vector .*no DoRA"):
        qlora.load_adapter(ours, tmp_path / "v4")


@pytest.mark.parametrize("kind, saved_whole", [("llava", []), ("llava", ["lm_head"]), ("gemma3", []),
                                               ("qwen2_5_vl", [])])
def test_vision_language_adapter_of_the_old_layout_loads_as_trained(tmp_path, tiny_tokenizer, kind, saved_whole):
    """Before transformers 4.52, Llava and Gemma 3 held their text model as ``language_model.model`` (the head as
    ``language_model.lm_head``) and Qwen2.5-VL as ``model``: adapters of that time name those paths, which
    transformers renames on load; qlora reads them under the new names (they were refused as made for another
    model; PEFT 0.21 fails on the head saved whole and leaves Qwen2.5-VL's layers at their initialization)."""
    import re

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from vision_language import build_tiny_vlm

    model_dir = build_tiny_vlm(tmp_path / kind, tiny_tokenizer, kind)
    base = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    trained = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, modules_to_save=saved_whole
                                              or None, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(trained.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    trained.eval().save_pretrained(tmp_path / "a")
    expected = _logits(trained)
    old = "model." if kind == "qwen2_5_vl" else r"language_model.model."
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({re.sub(r"^base_model\.model\.(model\.language_model\.|lm_head\.)",
                      lambda m: "base_model.model." + (old if m[1].startswith("model") else "language_model.lm_head."),
                      k): v for k, v in load_file(str(file)).items()}, str(file))
    assert not any(k.startswith("base_model.model.model.language_model.") for k in load_file(str(file)))

    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "a")
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-5, atol=1e-5)


@_FUSES_EXPERTS
def test_train_continues_a_per_expert_adapter_in_the_models_layout(tmp_path, saved, caplog):
    """``qlora train --adapter`` on a transformers 4.x Mixtral adapter (lora_dropout 0.1) trains its expert LoRA as
    PEFT's target_parameters (no dropout there, said once) and writes an adapter PEFT loads with qlora's outputs."""
    from peft import PeftModel

    from qlora.cli.main import main

    model_dir = saved("mixtral")
    _v4_adapter(model_dir, tmp_path / "v4", {"q_proj", "w1", "w2", "w3"}, dropout=0.1)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is a colour and {w} is a word."}) + "\n"
                            for w in ("red", "green", "blue", "gold")))
    assert main(["train", "--model", str(model_dir), "--adapter", str(tmp_path / "v4"), "--data", str(data),
                 "--output", str(tmp_path / "run"), "--max-steps", "2", "--seq-len", "32", "--quant", "none",
                 "--no-progress"]) == 0
    assert "lora_dropout (0.1) is not applied" in caplog.text
    ours, _ = load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "run")
    theirs = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32), tmp_path / "run").eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
