"""torch.distributed.checkpoint on models holding Linear4bit (FSDP2 users checkpoint this way).

A single-process gloo group on the CPU: ``get_model_state_dict`` must give the
bitsandbytes/transformers keys and bytes that ``state_dict()`` gives, before
and after :meth:`Linear4bit.make_shardable`, and a DCP save/load round trip
must restore the 4-bit weights exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from qlora.nn import Linear4bit


@pytest.fixture
def gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed: int, double_quant: bool) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        Linear4bit.from_linear(nn.Linear(128, 64), double_quant=double_quant),
        nn.ReLU(),
        Linear4bit.from_linear(nn.Linear(64, 32, bias=False), quant_type="fp4", blocksize=32, double_quant=double_quant),
        nn.Linear(32, 8),
    )


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("shardable", [False, True], ids=["buffers", "shardable"])
def test_dcp_state_dict_save_and_load(gloo, tmp_path, double_quant, shardable):
    model = _model(0, double_quant)
    if shardable:
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.make_shardable(torch.bfloat16)
    state = get_model_state_dict(model)
    _same(state, model.state_dict())
    assert "0.weight.quant_state.bitsandbytes__nf4" in state and "2.weight.quant_state.bitsandbytes__fp4" in state
    assert ("0.weight.nested_absmax" in state) == double_quant

    dcp.save(state, checkpoint_id=str(tmp_path / "ckpt"))
    other = _model(1, double_quant)
    if shardable:
        for m in other.modules():
            if isinstance(m, Linear4bit):
                m.make_shardable(torch.bfloat16)
    assert not torch.equal(other[0].dequantize(), model[0].dequantize())
    target = get_model_state_dict(other)
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(other, target)
    for i in (0, 2):
        assert torch.equal(other[i].dequantize(torch.float32), model[i].dequantize(torch.float32))
    x = torch.randn(3, 128)
    assert torch.equal(other(x), model(x))
