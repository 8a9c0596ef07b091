"""LoraLinear behaviour: several adapters, weighted combination, disabling, merge/unmerge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlora.nn import Linear4bit, LoraLinear, LoraSpec


def _layer(base: nn.Module, *names: str, rank: int = 4) -> LoraLinear:
    layer = LoraLinear(base)
    for i, name in enumerate(names):
        layer.add_adapter(name, LoraSpec(r=rank + i, alpha=8, rslora=(i == 1)))
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    return layer


def test_scaling_follows_lora_and_rslora():
    assert LoraSpec(r=16, alpha=32).scaling == 2.0
    assert LoraSpec(r=16, alpha=32, rslora=True).scaling == 32 / math.sqrt(16)


@pytest.mark.parametrize("quantized", [False, True])
def test_weighted_adapters_equal_the_sum_of_their_deltas(quantized):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    base = Linear4bit.from_linear(dense, compute_dtype=torch.float32) if quantized else dense
    layer = _layer(base, "a", "b")
    x = torch.randn(5, 64)
    w = layer.base_weight(torch.float32)
    layer.set_active({"a": 0.7, "b": -0.3})
    expected = x @ (w + 0.7 * layer.delta_weight("a") - 0.3 * layer.delta_weight("b")).T + dense.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with layer.adapters_disabled():
        torch.testing.assert_close(layer(x), x @ w.T + dense.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="unknown adapter"):
        layer.set_active({"c": 1.0})


def test_merge_unmerge_round_trip_on_a_dense_base():
    torch.manual_seed(1)
    layer = _layer(nn.Linear(32, 16), "a")
    x = torch.randn(3, 32)
    before = layer(x)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)  # merged adapters are not added twice
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_conv1d_base_is_a_transposed_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    conv = Conv1D(24, 40)  # nf=out, nx=in; weight [in, out]
    layer = _layer(conv, "a")
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (40, 24)
    x = torch.randn(2, 40)
    expected = x @ (conv.weight.T + layer.delta_weight("a")).T + conv.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_adapters_are_fp32_under_autocast():
    layer = _layer(Linear4bit.from_linear(nn.Linear(64, 64)), "a")
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.a.weight", "lora_B.a.weight"}
    assert layer.lora_A["a"].weight.dtype == torch.float32
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A["a"].weight.grad.dtype == torch.float32 and layer.lora_A["a"].weight.grad.abs().sum() > 0


def test_adapters_added_to_an_eval_model_do_not_drop_out(tiny_model_dir):
    import qlora

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.5)
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            nn.init.normal_(layer.lora_B["default"].weight)
    ids = torch.tensor([[1, 5, 9, 13]])
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
