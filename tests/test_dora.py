"""DoRA on a 4-bit base against PEFT's DoRA on the same dequantized weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qlora
from qlora.errors import UsageError
from qlora.nn import Linear4bit, LoraLinear, LoraSpec
from qlora.optim import lora_plus_param_groups

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dequantized_reference(model_dir, qmodel):
    """A plain transformers model whose linear weights are qlora's dequantized ones."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in qmodel.named_modules():
        if isinstance(module, Linear4bit):
            ref.get_submodule(name.replace(".base_layer", "")).weight.data.copy_(module.dequantize(torch.float32))
    return ref


def _dora_model(model_dir, rslora=False, seed=0):
    """A 4-bit model with a DoRA adapter whose B and magnitudes are not at their init."""
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(seed)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS, use_dora=True, rslora=rslora)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                layer.lora_B["default"].weight.normal_(std=0.05)
                layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.1 * torch.randn(layer.out_features))
    return model


def _grads(model, prefix=""):
    model(IDS, labels=IDS).loss.backward()
    return {n[len(prefix):]: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_backward_equal_peft_dora(tmp_path, tiny_model_dir, rslora):
    from peft import PeftModel

    model = _dora_model(tiny_model_dir, rslora)
    qlora.save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is rslora
    peft_model = PeftModel.from_pretrained(_dequantized_reference(tiny_model_dir, model), tmp_path / "ours",
                                           is_trainable=True)
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    ours, theirs = _grads(model), _grads(peft_model, "base_model.model.")
    assert set(ours) == set(theirs) and any("lora_magnitude_vector.default.weight" in k for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)


def test_dropout_path_equals_peft_layer():
    """With active dropout PEFT recomputes the base term on the dropped input; so do we."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(48, 40), compute_dtype=torch.float32)
    ref = nn.Sequential(nn.Linear(48, 40))
    ref[0].weight.data.copy_(q.dequantize(torch.float32))
    ref[0].bias.data.copy_(q.bias)
    ours = LoraLinear(q)
    ours.add_adapter("default", LoraSpec(r=4, alpha=8, dropout=0.3, use_dora=True))
    nn.init.normal_(ours.lora_B["default"].weight, std=0.1)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"], use_dora=True))
    theirs = pm.base_model.model[0]
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    ours.train(), pm.train()
    x = torch.randn(3, 5, 48)
    outs = []
    for layer in (ours, theirs):
        torch.manual_seed(1)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y, layer.lora_A["default"].weight.grad, layer.lora_magnitude_vector["default"].weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_we_load_peft_dora_and_merge_equals_adapter_model(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    pm = get_peft_model(_dequantized_reference(tiny_model_dir, model),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True,
                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    qlora.load_adapter(model, tmp_path / "theirs")
    adapted = model(IDS).logits
    torch.testing.assert_close(adapted, pm(IDS).logits, rtol=1e-5, atol=1e-5)
    layer = model.get_submodule("model.layers.0.self_attn.k_proj")
    x = torch.randn(2, 3, layer.in_features)
    before = layer(x)
    dense_w = layer.merged_weight(["default"])
    torch.testing.assert_close(nn.functional.linear(x, dense_w), before, rtol=1e-5, atol=1e-5)
    qlora.merge(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-4, atol=1e-4)


def test_layer_merge_unmerge_round_trip_with_weights():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24))
    layer.add_adapter("a", LoraSpec(r=4, alpha=8, use_dora=True))
    layer.add_adapter("b", LoraSpec(r=2, alpha=2))
    for n in ("a", "b"):
        nn.init.normal_(layer.lora_B[n].weight, std=0.1)
    layer.set_active({"a": 0.7, "b": 0.5})
    x = torch.randn(4, 32)
    before, w0 = layer(x), layer.base_layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.add_adapter("c", LoraSpec(r=2))
    with pytest.raises(ValueError, match="unmerge before merging more"):
        layer.merge(["c"])  # the merged DoRA norm was of the base without c
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=1e-5)


def test_lora_plus_groups_magnitudes_with_a_and_training_moves_them(tiny_model_dir):
    model = _dora_model(tiny_model_dir)
    groups = lora_plus_param_groups(model, lr=1e-3, ratio=16)
    mags = {id(p) for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    assert mags and mags <= {id(p) for p in groups[0]["params"]} and groups[1]["lr"] == 16e-3
    opt = torch.optim.AdamW(groups)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    for _ in range(2):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_dora_errors_are_clear(tmp_path, tiny_model_dir):
    model = _dora_model(tiny_model_dir)
    qlora.save_adapter(model, tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(cfg))
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="DoRA magnitudes"):
        qlora.load_adapter(fresh, tmp_path / "dora")


def test_embedding_dora_merge_unmerge_round_trip_and_gradients():
    """DoRA on a token embedding (PEFT's DoraEmbeddingLayer): a magnitude per embedding dimension over
    the table's column norms; merging folds exactly the forward pass, unmerging restores the table."""
    from qlora.nn import LoraEmbedding

    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(50, 16))
    layer.add_adapter("a", LoraSpec(r=4, alpha=8, use_dora=True))
    layer.add_adapter("b", LoraSpec(r=2, alpha=2))
    mag = layer.lora_magnitude_vector["a"].weight
    assert mag.shape == (16,)
    torch.testing.assert_close(mag, torch.linalg.norm(layer.base_layer.weight, dim=0))  # A starts at zero
    with torch.no_grad():
        for n in ("a", "b"):
            layer.lora_embedding_A[n].normal_(std=0.3)
        mag.mul_(1.5)
    layer.set_active({"a": 0.7, "b": 0.5})
    x = torch.randint(0, 50, (3, 7))
    before, w0 = layer(x), layer.base_layer.weight.clone()
    assert (before - layer.base_layer(x)).abs().max() > 0.1
    before.sum().backward()
    assert mag.grad is not None and mag.grad.abs().sum() > 0
    assert layer.lora_embedding_A["a"].grad.abs().sum() > 0
    layer.merge()
    torch.testing.assert_close(layer(x), before.detach(), rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_weighted_dora_after_another_adapter_adds_its_own_delta(kind):
    """``set_adapters`` promises ``base + sum_a w_a * delta_a``: a DoRA adapter active after a plain one
    rescales the base output, not the plain one's share too (as merging folds it), whatever the order."""
    from qlora.nn import LoraEmbedding

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24)) if kind == "linear" else LoraEmbedding(nn.Embedding(50, 24))
    layer.add_adapter("plain", LoraSpec(r=2, alpha=2))
    layer.add_adapter("dora", LoraSpec(r=4, alpha=8, use_dora=True))
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, 32) if kind == "linear" else torch.randint(0, 50, (4, 7))
    with torch.no_grad():
        base = layer.base_layer(x)
        alone = {}
        for n in ("plain", "dora"):
            layer.set_active({n: 1.0})
            alone[n] = layer(x) - base
        for order in (["plain", "dora"], ["dora", "plain"]):
            weights = {"plain": 0.5, "dora": 0.7}
            layer.set_active({n: weights[n] for n in order})
            expected = base + 0.5 * alone["plain"] + 0.7 * alone["dora"]
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=str(order))
            layer.merge()
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=f"merged {order}")
            layer.unmerge()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_training_step_with_dropout_equals_peft_dora(tmp_path, tiny_tokenizer, arch):
    """A whole 4-bit model in train mode, DoRA with dropout on linear layers (GPT-2's Conv1D too) and the
    token embedding: with one seed, PEFT draws the same dropout masks on the dequantized weights, so the
    loss and every adapter gradient agree (PEFT recomputes the base term on the dropped input; so do we)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / arch, tokenizer=tiny_tokenizer, arch=arch)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"] if arch == "llama" else ["c_attn", "c_fc", "wte"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.2, target_modules=targets, use_dora=True, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    qlora.save_adapter(model, tmp_path / "adapter")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            target = ref.get_submodule(name.replace(".base_layer", ""))
            w = module.dequantize(torch.float32)
            target.weight.data.copy_(w.t() if type(target).__name__ == "Conv1D" else w)
    peft_model = PeftModel.from_pretrained(ref, tmp_path / "adapter", is_trainable=True)
    model.train(), peft_model.train()
    results = []
    for m, prefix in ((model, ""), (peft_model, "base_model.model.")):
        torch.manual_seed(5)
        loss = m(IDS, labels=IDS).loss
        loss.backward()
        results.append((loss, {n[len(prefix):]: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (ours, our_grads), (theirs, their_grads) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert set(our_grads) == set(their_grads) and any("wte" in k or "embed" in k for k in our_grads)
    for key in our_grads:
        torch.testing.assert_close(our_grads[key], their_grads[key], rtol=1e-4, atol=1e-6, msg=key)
