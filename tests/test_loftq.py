"""LoftQ initialization: the 4-bit base and A, B chosen together approximate W better."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import qlora
from qlora.errors import UsageError
from qlora.nn import Linear4bit, LoraLinear, LoraSpec
from qlora.train.config import load_config
from qlora.train.trainer import Trainer

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])


def _structured_linear(out_f=256, in_f=192, rank=8, noise=0.02) -> nn.Linear:
    """Low-rank + noise weights, as trained layers look (random ones have no structure to find)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / rank**0.5
    linear = nn.Linear(in_f, out_f)
    linear.weight.data.copy_(w + noise * torch.randn(out_f, in_f, generator=g))
    return linear


def _error(layer: LoraLinear, w: torch.Tensor) -> float:
    return float(torch.linalg.norm(w - layer.merged_weight(["default"])))


def test_loftq_lowers_the_initial_error_of_a_structured_weight():
    linear = _structured_linear()
    w = linear.weight.detach().clone()
    plain = float(torch.linalg.norm(w - Linear4bit.from_linear(linear, compute_dtype=torch.float32).dequantize(torch.float32)))
    errors = {}
    for iters in (1, 5):
        layer = LoraLinear(_structured_linear())
        layer.add_adapter("default", LoraSpec(r=8, alpha=16, init="loftq", loftq_iter=iters))
        assert isinstance(layer.base_layer, Linear4bit)
        errors[iters] = _error(layer, w)
    print(f"\nLoftQ ||W - (deq(Q) + sBA)||_F on a 256x192 rank-8 + noise weight, r=8: plain NF4 {plain:.4f}; "
          f"LoftQ 1 iter {errors[1]:.4f} ({100 * (1 - errors[1] / plain):.1f}% lower); "
          f"5 iters {errors[5]:.4f} ({100 * (1 - errors[5] / plain):.1f}% lower)")
    assert errors[1] < 0.95 * plain and errors[5] < 0.9 * plain


def test_loftq_model_saves_its_base_with_the_adapter(tmp_path, tiny_model_dir):
    model, tok = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], init="loftq", loftq_iter=2)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, Linear4bit) and layer.lora_B["default"].weight.abs().sum() > 0
    qlora.quantize_model(model, compute_dtype=torch.float32, skip_modules=("lm_head", r".*\.lora_[AB]\..*"))
    expected = model(IDS).logits
    qlora.save_quantized(model, tmp_path / "base", tokenizer=tok)
    qlora.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "loftq" and cfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    again, _ = qlora.load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(again, tmp_path / "adapter")
    torch.testing.assert_close(again(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_loftq_errors_are_clear(tiny_model_dir):
    q4, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="full-precision"):
        qlora.add_lora(q4, r=4, init="loftq")
    dense, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="loftq_iter must be 1 to 5"):
        qlora.add_lora(dense, r=4, init="loftq", loftq_iter=9)
    qlora.add_lora(dense, r=4, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="first adapter"):
        qlora.add_lora(dense, r=4, target_modules=["q_proj"], init="loftq", adapter_name="second")
    with pytest.raises(UsageError, match="--quant nf4 or fp4"):
        load_config(None, {"model": "m", "data": "d", "output": "o", "init": "loftq", "quant": "none"})


def test_train_with_loftq_and_dora_writes_the_base(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The sky is blue {i}."}) for i in range(4)) + "\n")
    cfg = load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "out"),
                                 optim="adamw", max_steps=2, batch_size=2, progress=False, seq_len=32,
                                 init="loftq", dora=True, rank=4, target_modules="q_proj,v_proj"))
    losses = Trainer(cfg).run()
    assert len(losses) == 2 and all(l == l for l in losses)
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    base, _ = qlora.load_model(out / "loftq-base", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(base, out)
    assert any(isinstance(m, LoraLinear) and m.lora_magnitude_vector for m in base.modules())
