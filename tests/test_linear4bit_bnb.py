"""qlora's ``Linear4bit`` forward and backward against bitsandbytes' ``Linear4bit`` on the CPU, bit for bit.

Both dequantize the weight to the compute dtype and run a dense matmul; the input gradient is the output
gradient times the dequantized weight again. Odd feature counts (rows shorter than a block, blocks that
straddle rows), 3-D and 4-D inputs, inputs in a dtype other than the compute dtype, with and without a bias.
The bias gradient is compared with the exact float64 sum: bitsandbytes sums a 3-D gradient over its first
axis in the bias dtype and lets autograd sum the rest, qlora sums every row at once, so the two round
differently in 16 bits.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bnb_oracle import reference_path  # noqa: E402
from qlora.nn import Linear4bit  # noqa: E402

_ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _bnb_layer(dense: torch.nn.Linear, quant_type: str, dq: bool, compute: torch.dtype, blocksize: int):
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=compute, compress_statistics=dq, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=dq, blocksize=blocksize)._quantize("cpu")
    if dense.bias is not None:
        layer.bias = torch.nn.Parameter(dense.bias.detach().to(compute))
    return reference_path(layer)


@pytest.mark.parametrize("in_f, out_f", [(7, 5), (33, 65), (3, 200)])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("quant_type, dq, blocksize", [("nf4", True, 64), ("fp4", False, 32)])
def test_forward_and_backward_match_bitsandbytes(in_f, out_f, compute, quant_type, dq, blocksize):
    gen = torch.Generator().manual_seed(in_f * 1000 + out_f)
    for bias in (True, False):
        dense = torch.nn.Linear(in_f, out_f, bias=bias)
        theirs = _bnb_layer(dense, quant_type, dq, compute, blocksize)
        ours = Linear4bit.from_linear(dense, quant_type=quant_type, blocksize=blocksize, double_quant=dq,
                                      compute_dtype=compute)
        if bias:
            ours.bias.requires_grad_(True)
        for shape, dtype in (((2, 3, in_f), torch.float32), ((4, in_f), compute), ((1, 2, 2, in_f), compute)):
            case = f"{quant_type} dq={dq} bs={blocksize} {compute} bias={bias} x {dtype}{shape}"
            x = torch.randn(shape, generator=gen).to(dtype)
            x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
            assert y_ours.dtype == y_theirs.dtype == dtype and torch.equal(y_ours, y_theirs), f"output [{case}]"
            grad = torch.randn(y_ours.shape, generator=gen).to(dtype)
            y_ours.backward(grad)
            y_theirs.backward(grad)
            assert torch.equal(x_ours.grad, x_theirs.grad), f"input gradient [{case}]"
            if bias:
                exact = grad.to(compute).double().reshape(-1, out_f).sum(0)
                got = ours.bias.grad
                assert got.dtype == theirs.bias.grad.dtype == compute, case
                bound = _ULP[compute] * grad.to(compute).double().abs().reshape(-1, out_f).sum(0) + 1e-30
                assert ((got.double() - exact).abs() <= bound).all(), f"bias gradient [{case}]"
                ours.bias.grad = theirs.bias.grad = None


def test_asking_the_4bit_weight_for_a_gradient_is_refused_as_bitsandbytes_refuses_it():
    """bitsandbytes refuses requires_grad_(True) on its Linear4bit and on its Params4bit weight (uint8); qlora's
    layer refuses too, with a message naming the layer and what trains it instead, never silently no gradient,
    also where make_shardable (FSDP2) stores the codes as float parameters, which accept requires_grad."""
    dense = torch.nn.Linear(64, 32)
    theirs = _bnb_layer(dense, "nf4", True, torch.float32, 64)
    for target in (theirs, theirs.weight):
        with pytest.raises(RuntimeError):
            target.requires_grad_(True)
    ours = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"Linear4bit\(in_features=64, out_features=32.*frozen.*modules_to_save"):
        ours.requires_grad_(True)
    with pytest.raises(RuntimeError):
        ours.weight.requires_grad_(True)
    ours.requires_grad_(False)  # freezing is always fine
    ours.bias.requires_grad_(True)  # and the bias trains (PEFT's bias="all")
    ours(torch.randn(2, 64)).sum().backward()
    assert ours.bias.grad is not None
    sharded = Linear4bit.from_linear(dense, compute_dtype=torch.float32)
    sharded.make_shardable(torch.bfloat16)
    model = torch.nn.Sequential(sharded)
    model.requires_grad_(True)  # the codes are parameters here: torch lets them require a gradient
    assert sharded.weight.requires_grad
    with pytest.raises(RuntimeError, match=r"Linear4bit\(in_features=64.*no gradient reaches"):
        model(torch.randn(2, 64))
    with torch.no_grad():  # inference is unaffected
        assert torch.equal(model(torch.ones(2, 64)), ours(torch.ones(2, 64)))
