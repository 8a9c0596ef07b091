"""LoRA on an MoE router's 2-D weight, with PEFT as the oracle.

PEFT's ``all-linear`` on transformers 5's Qwen3-MoE, DeepSeek-V3, OLMoE and
Mixtral adapts the router (``target_parameters`` gains ``gate.weight``; PEFT
wraps the ``*TopKRouter`` in a ``ParamWrapper`` with ``(r, hidden)`` A and
``(experts, r)`` B, and the router runs on ``W + scale * B @ A``). qlora must
load such an adapter on its 4-bit base (the router stays 16-bit) with PEFT's
outputs, train it on, write it back for PEFT, and merge it as
``merge_and_unload``.
"""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora.model.load import load_model
from qlora.nn import RouterLora
from test_architectures_load import train_losses
from test_moe_expert_lora import _IDS, _dequantized_reference, _logits, _reference, _V5
from tiny_moe import tiny_moe_factory

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not _V5, reason="transformers 4.x routers are nn.Linear (adapted as linear layers)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    return tiny_moe_factory(tmp_path_factory, tiny_tokenizer)


def _peft_all_linear(path, out, seed=1):
    """PEFT's all-linear adapter on ``path`` with random non-zero B everywhere (the routers' too), saved to ``out``."""
    theirs = peft.get_peft_model(_reference(path), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    theirs.save_pretrained(out)
    return out


def _routers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, RouterLora)}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "olmoe", "mixtral", "glm4_moe", "ernie4_5_moe",
                                        "minimax"])
def test_peft_all_linear_adapter_with_the_router_loads_on_4bit_with_peft_outputs(tmp_path, saved, model_type):
    path = saved(model_type)
    adapter = _peft_all_linear(path, tmp_path / "a")
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, adapter)
    routers = _routers(ours)
    assert routers and all(r.base_layer.weight.dtype == torch.float32 for r in routers.values())  # never 4-bit
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(adapter)).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    # the routers' adapters matter: without them the outputs differ
    for r in routers.values():
        r.disabled = True
    assert not torch.allclose(_logits(ours), _logits(theirs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_training_on_moves_the_router_adapter_and_peft_reads_it_back(tmp_path, saved, model_type):
    from safetensors.torch import load_file

    path = saved(model_type)
    adapter = _peft_all_linear(path, tmp_path / "a")
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, adapter, trainable=True)
    router = next(iter(_routers(ours).values()))
    base_before = router.base_layer.weight.detach().clone()
    factors = {n: p.detach().clone() for n, p in router.named_parameters() if ".lora_" in f".{n}"}
    assert factors and all(p.requires_grad for n, p in router.named_parameters() if n in factors)
    losses = train_losses(ours, _IDS, steps=6)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(p, factors[n]) for n, p in router.named_parameters() if n in factors)
    assert torch.equal(router.base_layer.weight, base_before) and not router.base_layer.weight.requires_grad
    ours.eval()
    qlora.save_adapter(ours, tmp_path / "b")
    assert load_file(tmp_path / "b" / "adapter_model.safetensors").keys() == load_file(
        adapter / "adapter_model.safetensors").keys()
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(tmp_path / "b")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)


def test_add_lora_on_the_router_saves_what_peft_reads(tmp_path, saved):
    path = saved("olmoe")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=2, dropout=0.0, target_modules=["q_proj"], target_parameters=["gate.weight"])
    assert len(_routers(ours)) == 2
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    qlora.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_reference(path), str(tmp_path / "a")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_merge_equals_peft_merge_and_unload(tmp_path, saved, model_type):
    from qlora.model.merge import merged_tensors

    path = saved(model_type)
    adapter = _peft_all_linear(path, tmp_path / "a")
    expected = peft.PeftModel.from_pretrained(_reference(path), str(adapter)).merge_and_unload().state_dict()
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, adapter)
    with_adapter = _logits(ours)
    rows = {key: (shape, make()) for key, shape, make in merged_tensors(ours)}  # read before merge changes it
    qlora.merge(ours, dtype=torch.float32)
    assert not _routers(ours)
    mine = ours.state_dict()
    assert mine.keys() == expected.keys() == rows.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
        assert rows[key][0] == tuple(mine[key].shape), key
        torch.testing.assert_close(rows[key][1].to(mine[key].dtype), expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(_logits(ours), with_adapter, rtol=1e-4, atol=1e-4)


def test_disable_switch_and_delete_know_the_router_adapter(tmp_path, saved):
    from qlora.model.inject import adapters_disabled
    from qlora.model.multi_adapter import delete_adapter, set_adapter

    path = saved("qwen3_moe")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    base = _logits(ours)
    qlora.load_adapter(ours, _peft_all_linear(path, tmp_path / "one", seed=1), adapter_name="one")
    qlora.load_adapter(ours, _peft_all_linear(path, tmp_path / "two", seed=2), adapter_name="two")
    with adapters_disabled(ours):
        torch.testing.assert_close(_logits(ours), base, rtol=0, atol=0)
    set_adapter(ours, "two")
    theirs = peft.PeftModel.from_pretrained(_reference(path), str(tmp_path / "two")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    delete_adapter(ours, "two")
    delete_adapter(ours, "one")
    assert not _routers(ours)
    torch.testing.assert_close(_logits(ours), base, rtol=0, atol=0)


def test_cli_train_continues_a_router_adapter_and_merge_folds_it_in(tmp_path, saved):
    """``qlora train --adapter`` on PEFT's all-linear adapter (router included) trains the router's LoRA on the
    4-bit base; PEFT reads the result with qlora's outputs, and ``qlora merge`` folds the router delta in."""
    import json

    from safetensors.torch import load_file

    from qlora.cli.main import main

    path = saved("qwen3_moe")
    adapter = _peft_all_linear(path, tmp_path / "a")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} is a colour and {w} is a word."}) + "\n"
                            for w in ("red", "green", "blue", "gold")))
    assert main(["train", "--model", str(path), "--adapter", str(adapter), "--data", str(data), "--output",
                 str(tmp_path / "run"), "--max-steps", "2", "--seq-len", "32", "--lr", "1e-2", "--no-progress"]) == 0
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(
        tmp_path / "run" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    router_keys = [k for k in after if k.endswith("mlp.gate.lora_A.weight")]
    assert router_keys and all(not torch.equal(after[k], before[k]) for k in router_keys)
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "run")
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(tmp_path / "run")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "run"), "--output",
                 str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    torch.testing.assert_close(_logits(_reference(tmp_path / "merged")), _logits(ours), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_estimate_counts_the_router_adapters_as_add_lora_makes_them(saved, model_type):
    """``qlora estimate --target-parameters gate.weight`` counts what training makes (an error before)."""
    from qlora.model.estimate import TrainingOptions, estimate, load_config
    from qlora.model.inject import count_parameters

    path = saved(model_type)
    options = TrainingOptions(rank=3, target_modules=("o_proj",), target_parameters=("gate.weight",))
    lora_bytes = dict(estimate(load_config(str(path)), options).rows)["LoRA adapters (fp32)"]["QLoRA"]
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=3, dropout=0.0, target_modules=["o_proj"], target_parameters=["gate.weight"])
    assert _routers(ours) and lora_bytes == 4 * count_parameters(ours)[0]


def test_merge_keeps_deepseeks_fp32_router_unrounded(tmp_path, saved):
    """DeepSeek-V3 keeps its router in fp32 under bf16: the merged router stays fp32, its delta not rounded to bf16
    (as a router without adapter stays), so ``cast_merged`` writes PEFT's merged router exactly."""
    from qlora.model.merge import cast_merged

    path = saved("deepseek_v3")
    adapter = _peft_all_linear(path, tmp_path / "a")
    expected = peft.PeftModel.from_pretrained(_reference(path), str(adapter)).merge_and_unload().state_dict()
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    qlora.load_adapter(ours, adapter)
    router = next(iter(_routers(ours)))
    assert ours.get_submodule(router).base_layer.weight.dtype == torch.float32
    cast_merged(qlora.merge(ours, dtype=torch.bfloat16), torch.bfloat16)
    merged = ours.get_submodule(router).weight
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, expected[f"{router}.weight"], rtol=1e-6, atol=1e-6)


def test_a_target_parameter_naming_no_weight_here_adapts_nothing_as_in_peft(tmp_path, saved):
    """PEFT's all-linear writes target_parameters ``gate.weight`` for every MoE; Hunyuan's router is a linear layer
    (``gate.wg``, adapted through target_modules), so the name matches nothing and PEFT loads the adapter: so does
    qlora, with PEFT's outputs (refused before: 'gate.weight' matched no expert weight)."""
    path = saved("hunyuan_v1_moe")
    adapter = _peft_all_linear(path, tmp_path / "a")
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, adapter)
    assert not _routers(ours)
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(adapter)).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
