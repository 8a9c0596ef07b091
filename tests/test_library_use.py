"""qlora used as a library, the way PEFT + bitsandbytes + torch are: casts, argument spellings and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora
from qlora.errors import UsageError
from qlora.nn import Linear4bit


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("cast, dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.to("cpu", torch.float16), torch.float16),
    (lambda m: m.type(torch.float16), torch.float16),
    (lambda m: m.bfloat16().float(), torch.float32),
    (lambda m: m.to("cpu"), torch.float32),
])
def test_casting_a_4bit_layer_keeps_its_weight_and_computes_in_the_new_dtype(cast, dtype, double_quant):
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(dense, double_quant=double_quant, compute_dtype=torch.float32)
    weight = layer.dequantize(torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    cast(layer)
    assert torch.equal(layer.dequantize(torch.float32), weight)  # codebook and scales not rounded
    assert all(torch.equal(layer.state_dict()[k], v) and layer.state_dict()[k].dtype == v.dtype
               for k, v in state.items())
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(3, 96)
    expected = F.linear(x.to(dtype), weight.to(dtype), layer.bias)  # the bias is cast as any parameter is
    torch.testing.assert_close(layer(x.to(dtype)), expected, rtol=0, atol=0)


def test_a_cast_model_matches_its_uncast_copy(tiny_model_dir):
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"], verbose=False)
    ref = model(ids).logits
    cast = copy.deepcopy(model).half()
    torch.testing.assert_close(cast(ids).logits.float(), ref, atol=3e-2, rtol=3e-2)
    back = cast.float()  # the 4-bit layers survive a round trip of casts exactly
    for (name, a), b in zip(model.named_modules(), back.modules()):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), name
