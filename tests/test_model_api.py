"""The 4-bit LoRA model API against its peers: transformers, PEFT, bitsandbytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import qlora
from qlora.errors import UsageError
from qlora.model.tiny import ARCHITECTURES, build_tiny_model
from qlora.nn import Linear4bit, LoraLinear, LoraSpec

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])


def _dequantized_reference(model_dir, qmodel):
    """A plain transformers model whose linear weights are qlora's dequantized ones."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, module in qmodel.named_modules():
        if isinstance(module, Linear4bit) and ".modules_to_save." not in name:  # (an adapter's copy: not the base)
            target = ref.get_submodule(name.replace(".base_layer", "").replace(".original_module", ""))
            w = module.dequantize(torch.float32)
            target.weight.data.copy_(w.t() if module.from_conv1d else w)
    return ref


def test_linear4bit_gradients_equal_dense_layer_with_dequantized_weight():
    torch.manual_seed(0)
    dense = nn.Linear(96, 80)
    q = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
    ref = nn.Linear(96, 80)
    ref.weight.data.copy_(q.dequantize(torch.float32))
    ref.bias.data.copy_(dense.bias.data)
    layers = []
    for base in (q, ref):
        base.requires_grad_(False)
        layer = LoraLinear(base)
        layer.add_adapter("default", LoraSpec(r=8, alpha=16))
        layers.append(layer)
    layers[1].load_state_dict({k: v for k, v in layers[0].state_dict().items() if "lora_" in k}, strict=False)
    nn.init.normal_(layers[0].lora_B["default"].weight)
    layers[1].lora_B["default"].weight.data.copy_(layers[0].lora_B["default"].weight)
    grads = []
    for layer in layers:
        x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1), requires_grad=True)
        layer(x).square().sum().backward()
        grads.append((x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_linear4bit_keeps_no_dense_weight_for_backward():
    q = Linear4bit.from_linear(nn.Linear(256, 512), compute_dtype=torch.float32)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert all(t.numel() < 512 * 256 for t in saved)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architectures_load_exactly(tmp_path, tiny_tokenizer, arch):
    from transformers import AutoModelForCausalLM

    d = build_tiny_model(tmp_path / arch, tokenizer=tiny_tokenizer, arch=arch)
    dense, _ = qlora.load_model(d, quant=None, compute_dtype=torch.float32, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.testing.assert_close(dense(IDS).logits, ref(IDS).logits, rtol=0, atol=0)
    q, _ = qlora.load_model(d, quant="nf4", compute_dtype=torch.float32, device="cpu")
    n4 = sum(isinstance(m, Linear4bit) for m in q.modules())
    n_linear = sum(isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for m in ref.modules()) - 1  # minus lm_head
    assert n4 == n_linear > 0
    assert isinstance(q.get_output_embeddings(), nn.Linear)
    torch.testing.assert_close(q(IDS).logits, _dequantized_reference(d, q)(IDS).logits, rtol=1e-5, atol=1e-5)


def test_add_lora_errors_list_existing_layers(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="q_proj.*v_proj|k_proj"):
        qlora.add_lora(model, target_modules=["attention_dense"])


def test_gradient_checkpointing_gives_same_lora_gradients(tiny_model_dir):
    grads = []
    for checkpointing in (False, True, True):
        model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(0)
        qlora.add_lora(model, r=4, dropout=0.0)
        for layer in model.modules():
            if isinstance(layer, LoraLinear):
                nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": len(grads) == 2})
            model.enable_input_require_grads()
        model.train()
        model(IDS, labels=IDS).loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(v.abs().sum() > 0 for v in g.values())
        grads.append(g)
    for other in grads[1:]:
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], other[k], rtol=1e-5, atol=1e-7)


def _train_a_few_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_peft_reads_our_adapter_and_we_read_peft(tmp_path, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    _train_a_few_steps(model)
    qlora.save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not any(k.startswith("qlora") for k in cfg)  # PEFT's keys only
    assert json.loads((tmp_path / "ours" / "qlora_adapter.json").read_text())["qlora_format_version"] == 1
    ours = model(IDS).logits

    base = _dequantized_reference(tiny_model_dir, model)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours")
    torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-4, atol=1e-4)

    # PEFT -> qlora: a PEFT adapter with random B loads with the same logits.
    base2 = _dequantized_reference(tiny_model_dir, model)
    pm = get_peft_model(base2, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "theirs")
    theirs = pm(IDS).logits
    model2, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model2, tmp_path / "theirs")
    torch.testing.assert_close(model2(IDS).logits, theirs, rtol=1e-4, atol=1e-4)


def test_adapter_errors_and_atomic_save(tmp_path, tiny_model_dir, tiny_tokenizer):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4)
    out = qlora.save_adapter(model, tmp_path / "a")
    good = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="nothing does not exist; check the path of the adapter folder"):
        qlora.load_adapter(model, tmp_path / "nothing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((out / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(good[: len(good) // 2])
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="corrupted"):
        qlora.load_adapter(fresh, bad)
    other = build_tiny_model(tmp_path / "wide", tokenizer=tiny_tokenizer, arch="llama", hidden=96, intermediate=160)
    wide, _ = qlora.load_model(other, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="another base model"):
        qlora.load_adapter(wide, out)
    (bad / "qlora_adapter.json").write_text(json.dumps({"qlora_format_version": 99}))
    with pytest.raises(UsageError, match="newer qlora"):
        qlora.load_adapter(fresh, bad)
    # A failing save leaves the previous adapter untouched.
    model.__dict__["_qlora_adapters"]["default"].target_modules = object()  # not JSON-serializable
    with pytest.raises(TypeError):
        qlora.save_adapter(model, out)
    assert (out / "adapter_model.safetensors").read_bytes() == good


def test_merge_reloads_in_plain_transformers(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=8, dropout=0.0)
    _train_a_few_steps(model)
    expected = model(IDS).logits
    merged = qlora.merge(model, into="dequantized")
    assert not any(isinstance(m, (Linear4bit, LoraLinear)) for m in merged.modules())
    qlora.save_merged(merged, tmp_path / "merged", tokenizer=tiny_tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_merge_requantized_stays_4bit_and_close(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=8, dropout=0.0)
    _train_a_few_steps(model)
    expected = model(IDS).logits
    merged = qlora.merge(model, into="requantized")
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert sum(isinstance(m, Linear4bit) for m in merged.modules()) == 14
    assert (merged(IDS).logits - expected).abs().mean() < 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bitsandbytes_checkpoints_both_ways(tmp_path, tiny_tokenizer, arch):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    d = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    model, tok = qlora.load_model(d, compute_dtype=torch.float32, device="cpu")
    qlora.save_quantized(model, tmp_path / "q4", tokenizer=tok)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    torch.testing.assert_close(theirs(IDS).logits.float(), model(IDS).logits, rtol=2e-2, atol=2e-2)
    ours_again, _ = qlora.load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    torch.testing.assert_close(ours_again(IDS).logits, model(IDS).logits, rtol=0, atol=0)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    # dtype given: transformers 4.x would cast the fp32 checkpoint to fp16 before quantizing (5.x keeps fp32)
    tq = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    tq.save_pretrained(tmp_path / "tq4")
    tiny_tokenizer.save_pretrained(tmp_path / "tq4")
    loaded, _ = qlora.load_model(tmp_path / "tq4", compute_dtype=torch.float32, device="cpu")
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_unknown_adapter_config_keys_warn_and_load(tmp_path, tiny_model_dir, caplog):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0)
    out = qlora.save_adapter(model, tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert json.loads((out / "qlora_adapter.json").read_text())["qlora_version"] == qlora.__version__
    (out / "adapter_config.json").write_text(json.dumps(cfg | {"from_the_future": 1}))
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_adapter(fresh, out)
    assert "from_the_future" in caplog.text
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_readme_python_api_runs_after_a_plain_import(tmp_path, tiny_model_dir):
    """The README's Python API, in a fresh interpreter: ``import qlora`` alone reaches ``qlora.optim.PagedAdamW``
    (a subpackage not yet imported, so this runs outside pytest's process, where it already is)."""
    script = f"""
import qlora
model, tokenizer = qlora.load_model({str(tiny_model_dir)!r}, quant="nf4")
qlora.add_lora(model, r=16, alpha=16, target_modules="all-linear")
optimizer = qlora.optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
batch = tokenizer("def add(a, b): return a + b", return_tensors="pt")
model(**batch, labels=batch["input_ids"]).loss.backward()
optimizer.step()
qlora.save_adapter(model, {str(tmp_path / "adapter")!r})
"""
    src = Path(qlora.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(src)})
    assert done.returncode == 0, done.stderr[-2000:]
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = [t for k, t in saved.items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b)  # B starts at zero: the optimizer step reached the adapter
