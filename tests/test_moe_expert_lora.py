"""LoRA on MoE expert weights (PEFT's ``target_parameters``), with PEFT as the oracle.

PEFT's ``ParamWrapper`` adapts a 3-D expert weight with one ``(r * E, in)`` A and
one ``(out, r * E)`` B; qlora must compute the same outputs from the same
tensors (on a 16-bit base, and on the 4-bit base against PEFT on its dequantized
weights), read and write the same files, train them, and merge them as PEFT's
``merge_and_unload``.
"""

from __future__ import annotations

import json

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.load import load_model
from qlora.nn import Experts4bit, ExpertsLora, Linear4bit
from test_architectures_load import train_losses
from tiny_moe import tiny_moe_factory

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12], [3, 9, 27, 81, 200, 150, 11, 4, 66, 90]])
_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Llama 4 predates transformers' experts flags: (E, in, out) weights applied by bmm to pre-routed rows
_LLAMA4_EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    factory = tiny_moe_factory(tmp_path_factory, tiny_tokenizer)

    def get(model_type: str):
        if not _V5 and model_type != "llama4_text":  # Llama 4's experts were 3-D already in 4.x
            pytest.skip(f"transformers 4.x keeps {model_type}'s experts as per-expert linear layers (or in a layout "
                        "qlora does not adapt): expert LoRA needs transformers 5")
        return factory(model_type)
    return get


@pytest.mark.skipif(_V5, reason="the refusal under transformers 4.x")
def test_expert_lora_under_transformers_4_says_it_needs_5(tmp_path_factory, tiny_tokenizer):
    ours, _ = load_model(tiny_moe_factory(tmp_path_factory, tiny_tokenizer)("qwen3_moe"), quant="nf4",
                         compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="LoRA on expert weights needs transformers 5"):
        qlora.add_lora(ours, r=2, dropout=0.0, target_parameters=_EXPERTS)


def _reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _randomize_b(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def _logits(model):
    with torch.no_grad():
        return model(_IDS).logits


@pytest.mark.parametrize("model_type,rslora,modules", [("gpt_oss", False, None), ("qwen3_moe", True, None),
                                                       ("mixtral", False, ["q_proj", "v_proj"]),
                                                       ("deepseek_v3", False, ["o_proj"]),
                                                       ("llama4_text", False, ["q_proj"])])
def test_16bit_outputs_and_files_equal_peft_both_ways(tmp_path, saved, model_type, rslora, modules):
    path = saved(model_type)
    targets = _LLAMA4_EXPERTS if model_type == "llama4_text" else _EXPERTS
    # PEFT makes the adapter (random non-zero B), saves it; qlora loads it and gives PEFT's logits
    config = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.0, target_modules=modules or [],
                             target_parameters=targets, use_rslora=rslora)
    theirs = peft.get_peft_model(_reference(path), config).eval()
    _randomize_b(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "peft")
    experts = [m for m in ours.modules() if isinstance(m, ExpertsLora)]
    assert experts and all(set(m.targets["default"]) == {"gate_up_proj", "down_proj"} for m in experts)
    base = _logits(_reference(path))
    assert (_logits(theirs) - base).abs().max() > 1e-2  # the expert adapters change the output
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)

    # qlora saves: the same keys, shapes and values as PEFT's file; PEFT loads it with the same logits
    qlora.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    mine, peft_file = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft" / "adapter_model.safetensors")
    assert mine.keys() == peft_file.keys() and any(".experts.base_layer.lora_A" in k for k in mine)
    assert all(torch.equal(mine[k], peft_file[k]) for k in mine)
    saved_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(saved_config["target_parameters"]) == sorted(targets) and saved_config["lora_dropout"] == 0.0
    again = peft.PeftModel.from_pretrained(_reference(path), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=1e-5, atol=1e-5)


def test_rank_per_expert_and_layout_equal_peft(saved):
    """A is (r*E, in) and B is (out, r*E) with expert e on B's strided columns e, e+E, ...: a B that is
    non-zero for expert 1 only changes exactly the tokens routed to expert 1, as in PEFT."""
    path = saved("qwen3_moe")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=3, dropout=0.0, target_modules=None, target_parameters=["0.mlp.experts.down_proj"])
    layer = ours.model.layers[0].mlp.experts
    assert isinstance(layer, ExpertsLora) and not isinstance(ours.model.layers[1].mlp.experts, ExpertsLora)
    a, b = layer.lora_A["down_proj"]["default"].weight, layer.lora_B["down_proj"]["default"].weight
    assert a.shape == (3 * 4, 32) and b.shape == (32, 3 * 4)
    with torch.no_grad():
        b[:, 1::4] = torch.randn(32, 3)
    delta = layer.delta_weight("down_proj", "default")
    assert delta.shape == (4, 32, 32) and delta[1].abs().sum() > 0
    assert delta[[0, 2, 3]].abs().sum() == 0
    theirs = peft.get_peft_model(_reference(path), peft.LoraConfig(r=3, lora_alpha=16, target_modules=[],
                                                                    target_parameters=["0.mlp.experts.down_proj"]))
    wrapper = theirs.base_model.model.model.layers[0].mlp.experts
    wrapper.lora_A["default"].weight.data.copy_(a)
    wrapper.lora_B["default"].weight.data.copy_(b)
    torch.testing.assert_close(delta, wrapper.get_delta_weight("default"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), rtol=1e-5, atol=1e-5)


def _dequantized_reference(path, ours):
    """transformers' model holding exactly qlora's dequantized 4-bit weights (the 4-bit base's oracle)."""
    ref = _reference(path)
    with torch.no_grad():
        for name, module in ours.named_modules():
            name = name.removesuffix(".base_layer")
            if isinstance(module, Experts4bit):
                for w in module.weight_names:
                    getattr(ref.get_submodule(name), w).copy_(module.dequantize(w, torch.float32))
            elif isinstance(module, Linear4bit) and ".experts." not in name:
                ref.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    return ref


@pytest.mark.parametrize("model_type", ["gpt_oss", "mixtral", "llama4_text"])
def test_4bit_experts_equal_peft_on_the_dequantized_weights(tmp_path, saved, model_type):
    path = saved(model_type)
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    llama4 = model_type == "llama4_text"
    qlora.add_lora(ours, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                   target_parameters=_LLAMA4_EXPERTS if llama4 else _EXPERTS)
    layer = ours.model.layers[1].get_submodule("feed_forward" if llama4 else "mlp").experts
    assert isinstance(layer, ExpertsLora) and isinstance(layer.base_layer, Experts4bit)
    assert not [n for n, p in ours.named_parameters() if p.dim() == 3]  # no dense copy of the experts
    _randomize_b(ours)
    qlora.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(tmp_path / "a")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    # and the 4-bit model loads the file back to the same outputs
    again, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "llama4_text"])
def test_training_moves_the_expert_adapters_and_lowers_the_loss(saved, model_type):
    ours, _ = load_model(saved(model_type), quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=4, dropout=0.0, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".experts.lora_" in n for n in trainable)
    moe = ours.model.layers[0].get_submodule("feed_forward" if model_type == "llama4_text" else "mlp")
    router = (moe.router if model_type == "llama4_text" else moe.gate).weight
    router_before = router.detach().clone()
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = train_losses(ours, _IDS, steps=8)
    assert losses[-1] < losses[0] - 0.05
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert {n.split(".lora_")[1].split(".")[:2][0] for n in moved} == {"A", "B"} and len(moved) == len(trainable)
    assert torch.equal(router, router_before) and not router.requires_grad


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text"])
def test_merge_equals_peft_merge_and_unload(tmp_path, saved, model_type):
    path = saved(model_type)
    ours, tokenizer = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=2, dropout=0.0, target_modules=["q_proj"],
                   target_parameters=_LLAMA4_EXPERTS if model_type == "llama4_text" else _EXPERTS)
    _randomize_b(ours)
    adapter = qlora.save_adapter(ours, tmp_path / "a")
    merged_theirs = peft.PeftModel.from_pretrained(_reference(path), str(adapter)).merge_and_unload()
    expected = merged_theirs.state_dict()
    with_adapter = _logits(ours)
    qlora.merge(ours, dtype=torch.float32)
    assert not any(isinstance(m, ExpertsLora) for m in ours.modules())
    mine = ours.state_dict()
    assert mine.keys() == expected.keys()
    for key in mine:
        torch.testing.assert_close(mine[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(_logits(ours), with_adapter, rtol=1e-4, atol=1e-4)  # summation order only


def test_4bit_merge_streamed_and_in_place_match_the_adapter_model(tmp_path, saved):
    from qlora.model.merge import merged_tensors

    path = saved("mixtral")
    ours, tokenizer = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=2, dropout=0.0, target_modules=None, target_parameters=["down_proj"])
    _randomize_b(ours)
    with_adapter = _logits(ours)
    rows = {key: (shape, make) for key, shape, make in merged_tensors(ours)}
    qlora.merge(ours, dtype=torch.float32)
    state = ours.state_dict()
    assert rows.keys() == state.keys()
    for key, (shape, make) in rows.items():
        assert tuple(state[key].shape) == shape
        torch.testing.assert_close(make().float(), state[key].float(), rtol=0, atol=0, msg=key)
    qlora.save_merged(ours, tmp_path / "merged", tokenizer)
    torch.testing.assert_close(_logits(_reference(tmp_path / "merged")), with_adapter, rtol=1e-5, atol=1e-5)


def test_bad_target_parameters_are_usage_errors(saved):
    ours, _ = load_model(saved("qwen3_moe"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"'mlp\.experts\.up_proj'.*named: down_proj, gate_up_proj"):
        qlora.add_lora(ours, r=2, dropout=0.0, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.up_proj"])
    with pytest.raises(UsageError, match=r"post_attention_layernorm\.weight.*neither an expert weight nor a router's"
                                         r".*routers' weights.*mlp\.gate\.weight"):
        qlora.add_lora(ours, r=2, dropout=0.0, target_parameters=["post_attention_layernorm.weight"])
    with pytest.raises(UsageError, match="dropout"):
        qlora.add_lora(ours, r=2, dropout=0.05, target_parameters=_EXPERTS)
    assert not any(isinstance(m, ExpertsLora) for m in ours.modules())  # nothing half-attached
    dense, _ = load_model(saved("qwen3_moe"), quant=None, compute_dtype=torch.float32, device="cpu")
    dense_llama = [n for n, _ in dense.named_parameters() if "q_proj" in n]
    assert dense_llama
    with pytest.raises(UsageError, match="neither an expert weight nor a router's"):
        qlora.add_lora(dense, r=2, dropout=0.0, target_parameters=["self_attn.q_proj.weight"])


def test_cli_train_resume_generate_merge_with_target_parameters(tmp_path, saved, capsys):
    from qlora.cli.main import main

    path = saved("qwen3_moe")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 2?", "input": "", "output": f"{a + 2}."})
                            + "\n" for a in range(8)))
    out, cut = tmp_path / "run", tmp_path / "cut"

    def train(folder, *extra):
        return main(["train", "--model", str(path), "--data", str(data), "--output", str(folder), "--seq-len", "48",
                     "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--target-modules", "none",
                     "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj",
                     "--save-steps", "1", "--max-steps", "3", *extra])
    capsys.readouterr()
    assert main(["train", "--model", str(path), "--data", str(data), "--output", str(tmp_path / "bad"),
                 "--target-parameters", "mlp.experts.down_proj", "--dropout", "0.1", "--max-steps", "1",
                 "--no-progress"]) == 2
    assert "--dropout 0" in capsys.readouterr().err  # PEFT refuses dropout on expert adapters; 0 is the default
    assert train(out) == 0 and train(cut) == 0
    import shutil

    from safetensors.torch import load_file

    shutil.rmtree(cut / "checkpoints" / "step-0000003")  # as if cut off after step 2
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (cut / name).unlink()
    assert train(cut, "--resume") == 0
    full, resumed = load_file(out / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert full.keys() == resumed.keys() and any(".experts.base_layer.lora_B" in k for k in full)
    for key in full:  # the expert adapters and their optimizer state came back from the checkpoint
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-6, atol=1e-7, msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == _EXPERTS and config["target_modules"] == []
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, out)
    assert sum(isinstance(m, ExpertsLora) for m in ours.modules()) == 2
    theirs = peft.PeftModel.from_pretrained(_dequantized_reference(path, ours), str(out)).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    assert main(["generate", "--model", str(path), "--adapter", str(out), "--prompt", "What is 3 plus 2?",
                 "--max-new-tokens", "4"]) == 0
    assert main(["merge", "--model", str(path), "--adapter", str(out), "--output", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    merged = _reference(tmp_path / "merged")
    torch.testing.assert_close(_logits(merged), _logits(ours), rtol=1e-4, atol=1e-4)


def test_two_expert_adapters_switch_weight_and_disable(tmp_path, saved):
    from qlora.model.inject import adapters_disabled
    from qlora.model.multi_adapter import adapter_rows, set_adapter, set_adapters

    path = saved("qwen3_moe")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    base = _logits(ours)
    for seed, name in ((1, "one"), (2, "two")):
        qlora.add_lora(ours, r=2, dropout=0.0, target_modules=None, target_parameters=_EXPERTS, adapter_name=name)
        with torch.no_grad():
            for p in [p for n, p in ours.named_parameters() if f"lora_B.down_proj.{name}" in n]:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        qlora.save_adapter(ours, tmp_path / name, adapter_name=name)
    with adapters_disabled(ours):
        torch.testing.assert_close(_logits(ours), base, rtol=0, atol=0)
    set_adapter(ours, "two")
    theirs = peft.PeftModel.from_pretrained(_reference(path), str(tmp_path / "two")).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    set_adapters(ours, {"one": 0.0, "two": 0.0})
    torch.testing.assert_close(_logits(ours), base, rtol=1e-6, atol=1e-6)
    with pytest.raises(UsageError, match="target_parameters"):
        with adapter_rows(ours, ["one", "two"]):
            pass


def test_estimate_counts_the_expert_adapters_as_add_lora_makes_them(saved):
    from qlora.model.estimate import TrainingOptions, estimate, load_config
    from qlora.model.inject import count_parameters

    path = saved("mixtral")
    est = estimate(load_config(str(path)), TrainingOptions(rank=3, target_modules=("q_proj",),
                                                           target_parameters=("mlp.experts.down_proj",)))
    lora_bytes = dict(est.rows)["LoRA adapters (fp32)"]["QLoRA"]
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=3, dropout=0.0, target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    assert lora_bytes == 4 * count_parameters(ours)[0]
    with pytest.raises(UsageError, match="expert weights are down_proj, gate_up_proj"):
        estimate(load_config(str(path)), TrainingOptions(target_parameters=("experts.w2",)))


def test_yaml_target_parameters_list_and_peft_alias(tmp_path):
    from qlora.train.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\noutput: o\ntarget_modules: none\nlora_dropout: 0\n"
                    "target_parameters: [7.mlp.experts.gate_up_proj, 7.mlp.experts.down_proj]\n")
    cfg = load_config(path, {})
    assert cfg.target_parameters == "7.mlp.experts.gate_up_proj,7.mlp.experts.down_proj"
    assert cfg.target_modules == "none" and cfg.dropout == 0
    path.write_text("model: m\ndata: d\noutput: o\nlora_target_parameters: [mlp.experts.down_proj]\n")
    assert load_config(path, {}).target_parameters == "mlp.experts.down_proj"


def test_merged_weight_on_a_16bit_base_leaves_the_base_alone(saved):
    """Reading the merged expert weight (merge, GGUF export) must not fold the delta into a float32 base in place:
    a second read, and the adapter model's own forward, would then count the adapter twice."""
    model, _ = load_model(saved("mixtral"), quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=2, dropout=0.0, target_modules=None, target_parameters=["gate_up_proj"])
    _randomize_b(model)
    before = _logits(model)
    experts = next(m for m in model.modules() if isinstance(m, ExpertsLora))
    first = experts.merged_weight("gate_up_proj")
    torch.testing.assert_close(experts.merged_weight("gate_up_proj"), first, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_rank_and_alpha_patterns_on_expert_weights_are_per_weight_as_peft(tmp_path, saved, model_type):
    """PEFT matches rank_pattern and alpha_pattern against each expert weight's name (``<module>.down_proj``), so
    one experts module holds factors of two ranks; such a PEFT adapter loads with PEFT's outputs (it was refused as
    made for another model: qlora gave every weight of the module one rank), and qlora's own is written for PEFT."""
    path = saved(model_type)
    options = dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=_EXPERTS,
                   rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\.mlp\.experts\.gate_up_proj": 16})
    theirs = peft.get_peft_model(_reference(path), peft.LoraConfig(init_lora_weights=False, **options))
    _randomize_b(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, tmp_path / "theirs")
    experts = ours.model.layers[1].mlp.experts
    assert (experts.lora_A["down_proj"]["default"].weight.shape[0], experts.lora_A["gate_up_proj"]["default"]
            .weight.shape[0]) == (4 * experts.num_experts, 2 * experts.num_experts)
    torch.testing.assert_close(_logits(ours), _logits(theirs.eval()), rtol=1e-5, atol=1e-5)

    fresh, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(fresh, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"], target_parameters=_EXPERTS,
                   rank_pattern=options["rank_pattern"], alpha_pattern=options["alpha_pattern"])
    _randomize_b(fresh)
    qlora.save_adapter(fresh, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_reference(path), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(_logits(again), _logits(fresh), rtol=1e-5, atol=1e-5)

