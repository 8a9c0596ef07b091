"""MoE experts in layouts of their own (DBRX's 2-D ``(E * I, H)`` stacks, JetMoE's parallel experts,
LongCat-Flash's zero experts) are stored in 4 bits like transformers' standard experts modules.

Oracles: transformers' forward on qlora's dequantized weights, transformers' reload of the merged
checkpoint, transformers + bitsandbytes' own 4-bit checkpoint, and the loaded model's bytes for
``qlora estimate``.
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora.model.load import load_model
from qlora.model.quantize import read_as_tensors_names
from qlora.nn import Experts4bit, Linear4bit
from test_moe_models import assert_merged_reloads_with_the_4bit_logits
from tiny_own_layouts import save_tiny

transformers = pytest.importorskip("transformers")
_TYPES = ["dbrx", "jetmoe", "longcat_flash"]
_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12], [3, 9, 27, 81, 200, 150, 11, 4, 66, 90]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    cache = {}

    def get(model_type: str):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            pytest.skip(f"this transformers has no {model_type!r} models")
        if model_type not in cache:
            cache[model_type] = save_tiny(tmp_path_factory.mktemp(model_type), tiny_tokenizer, model_type)
        return cache[model_type]
    return get


# The experts module of each model type; transformers 4.x has no LongcatFlashExperts (its LongCat-Flash experts
# are a ModuleList of MLPs whose nn.Linear layers the plain path quantizes).
_EXPERTS = {"dbrx": "DbrxExperts", "jetmoe": "JetMoeParallelExperts", "longcat_flash": "LongcatFlashExperts"}


def _skip_without_experts_module(model_type: str) -> None:
    modeling = pytest.importorskip(f"transformers.models.{model_type}.modeling_{model_type}")
    if not hasattr(modeling, _EXPERTS[model_type]):
        pytest.skip(f"this transformers has no {_EXPERTS[model_type]} (its {model_type} experts are nn.Linear)")


def _reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", _TYPES)
def test_4bit_experts_equal_transformers_on_the_dequantized_weights(saved, model_type):
    _skip_without_experts_module(model_type)
    path = saved(model_type)
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    experts = {n: m for n, m in ours.named_modules() if isinstance(m, Experts4bit)}
    assert experts, "experts were not swapped for 4-bit ones"
    ref = _reference(path)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, Experts4bit):
                for w in module.weight_names:
                    target = ref.get_submodule(name).get_parameter(w)
                    target.copy_(module.dequantize(w, torch.float32))
                    # expert 0's matrix, sliced as transformers' forward slices it, is its own Linear4bit's
                    first = module.layers(w)[0].dequantize(torch.float32)
                    rows = first.shape[1] if module.layout.applied_transposed(w) else first.shape[0]
                    sliced = target[:rows] if target.dim() == 2 else target[0]
                    assert torch.equal(sliced, first.t() if module.layout.applied_transposed(w) else first), w
            elif isinstance(module, Linear4bit) and not any(name.startswith(e + ".") for e in experts):
                ref.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
        torch.testing.assert_close(ours(_IDS).logits, ref(_IDS).logits, rtol=1e-5, atol=1e-5)
    # no 16/32-bit expert weight is left: the dense parameters are the reference's less the 4-bit ones
    quantized = sum(ref.get_submodule(n).weight.numel() for n, m in ours.named_modules()
                    if isinstance(m, Linear4bit) and not n.startswith(tuple(e + "." for e in experts)))
    in_experts = sum(ref.get_submodule(e).get_parameter(w).numel() for e, m in experts.items()
                     for w in m.weight_names)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) - quantized - in_experts


@pytest.mark.parametrize("model_type", _TYPES)
def test_merged_model_loads_in_transformers_with_the_4bit_logits(tmp_path, saved, model_type):
    assert_merged_reloads_with_the_4bit_logits(saved(model_type), tmp_path / "merged")


@pytest.mark.parametrize("model_type", _TYPES)
def test_estimate_counts_the_experts_as_the_loaded_model_holds_them(saved, model_type):
    from qlora.model.estimate import TrainingOptions, estimate, load_config

    path = saved(model_type)
    model, _ = load_model(path, compute_dtype=torch.bfloat16, device="cpu")
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    actual = sum(t.numel() * t.element_size() for t in tensors)
    est = estimate(load_config(str(path)), TrainingOptions())
    resident = ("linear weights", "quantization constants", "embeddings", "buffers")
    assert sum(values["QLoRA"] for label, values in est.rows if label.startswith(resident)) == actual


@pytest.mark.parametrize("model_type", _TYPES)
def test_train_attention_lora_then_merge_then_quantize(tmp_path, saved, capsys, model_type):
    """2 steps of QLoRA on the attention layers; the merged folder reloads in transformers with qlora's
    logits; `qlora quantize` writes the experts 16-bit (bitsandbytes packs nn.Linear only), which qlora
    loads with its experts 4-bit, equal to loading the merged folder."""
    from qlora.cli.main import main

    _skip_without_experts_module(model_type)
    path = saved(model_type)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 2?", "input": "", "output": f"{a + 2}."})
                            + "\n" for a in range(8)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--data", str(data), "--output", str(out), "--seq-len", "48",
                 "--batch-size", "2", "--lr", "1e-2", "--max-steps", "2", "--no-progress"]) == 0
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets and not targets & {"w1", "v1", "w2", "input_linear", "output_linear", "weight"}
    import qlora

    four_bit, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(four_bit, out)
    assert main(["merge", "--model", str(path), "--adapter", str(out), "--output", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    merged = _reference(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(_IDS).logits, four_bit(_IDS).logits, rtol=1e-4, atol=1e-4)

    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4"),
                 "--compute-dtype", "fp32"]) == 0
    assert "experts (" in capsys.readouterr().out
    again, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    direct, _ = load_model(tmp_path / "merged", compute_dtype=torch.float32, device="cpu")
    assert any(isinstance(m, Experts4bit) for m in again.modules())
    with torch.no_grad():
        torch.testing.assert_close(again(_IDS).logits, direct(_IDS).logits, rtol=0, atol=0)


def test_expert_lora_on_these_layouts_is_refused_clearly(saved):
    import qlora
    from qlora.errors import UsageError

    model, _ = load_model(saved("dbrx"), compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="DbrxExperts.*target_modules"):
        qlora.add_lora(model, r=4, dropout=0.0, target_modules=None, target_parameters=["experts.mlp.w1"])


def test_estimate_refuses_expert_lora_on_these_layouts_as_training_does(saved):
    from qlora.errors import UsageError
    from qlora.model.estimate import TrainingOptions, estimate, load_config

    config = load_config(str(saved("dbrx")))
    with pytest.raises(UsageError, match="w1, an expert weight in a layout of its own.*--target-modules"):
        estimate(config, TrainingOptions(target_parameters=("experts.mlp.w1",)))


@pytest.mark.parametrize("model_type", _TYPES)
def test_bitsandbytes_checkpoints_load_with_4bit_experts(tmp_path, saved, model_type):
    """transformers + bitsandbytes keeps these experts 16-bit in its 4-bit files: qlora loads them with 4-bit
    experts, the very codes it gives them from the 16-bit checkpoint. (The file's routers are nn.Linear layers
    bitsandbytes packs, which qlora keeps 16-bit when it quantizes: they load as the file has them, or, where the
    model's code reads the router's weight as a tensor (LongCat-Flash's classifier), as bitsandbytes' dequantization
    of the file's codes.)"""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    _skip_without_experts_module(model_type)
    path = saved(model_type)
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu",
                                                               dtype=torch.float32)
    out = tmp_path / "bnb"
    theirs.save_pretrained(out)
    for f in path.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    prequantized, _ = load_model(out, compute_dtype=torch.float32, device="cpu")
    direct, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    experts = [n for n, m in prequantized.named_modules() if isinstance(m, Experts4bit)]
    assert experts and experts == [n for n, m in direct.named_modules() if isinstance(m, Experts4bit)]
    mine, ref = prequantized.state_dict(), direct.state_dict()
    routers = tuple(sorted({k.split(".weight")[0] for k in mine.keys() ^ ref.keys()}))
    decoded = tuple(sorted(n for n in read_as_tensors_names(direct) if n.endswith(("router.layer", "classifier"))))
    assert (routers or decoded) and all(r.endswith(("router.layer", "classifier")) for r in routers + decoded)
    for name in decoded:
        packed = theirs.get_submodule(name).weight
        torch.testing.assert_close(mine[f"{name}.weight"], bitsandbytes.functional.dequantize_4bit(
            packed.data, packed.quant_state).to(torch.float32), rtol=0, atol=1e-6)
    same = [k for k in mine if k in ref and not k.startswith(routers + decoded)]
    assert [k for k in same if k.startswith(tuple(experts))]
    assert all(torch.equal(mine[k], ref[k]) for k in same)
