"""The 4-bit functions called as a library user calls them: on a model's parameters, with results of two calls
mixed up, with a dtype that is no float dtype, on the meta device. Each works as bitsandbytes does or is refused
with one ValueError naming the problem (not an error from inside torch's kernels)."""

from __future__ import annotations

import pytest
import torch

bnb_F = pytest.importorskip("bitsandbytes.functional")

from qlora.quant import dequantize_4bit, dynamic_code, quantize_4bit, quantize_blockwise  # noqa: E402


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_parameter_that_requires_grad_quantizes_as_its_values(double_quant):
    torch.manual_seed(0)
    weight = torch.nn.Linear(96, 40).weight  # requires grad, as every trained weight does
    packed, state = quantize_4bit(weight, double_quant=double_quant)
    theirs, their_state = bnb_F.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(packed.view(-1), theirs.view(-1))
    assert torch.equal(state.absmax, their_state.absmax)
    assert not packed.requires_grad and not state.absmax.requires_grad
    assert torch.equal(dequantize_4bit(packed, state), dequantize_4bit(*quantize_4bit(weight.detach(),
                                                                                     double_quant=double_quant)))


def test_blockwise_constants_of_a_parameter_hold_no_graph():
    weight = torch.nn.Parameter(torch.randn(300))
    codes, absmax = quantize_blockwise(weight, dynamic_code())
    assert absmax.grad_fn is None and not absmax.requires_grad
    assert torch.equal(absmax, quantize_blockwise(weight.detach(), dynamic_code())[1])


def test_packed_data_of_another_tensor_is_refused_naming_the_mismatch():
    packed, _ = quantize_4bit(torch.randn(10, 64))
    _, state = quantize_4bit(torch.randn(33, 65))
    with pytest.raises(ValueError, match=r"do not belong together.*\(33, 65\).*packed bytes: 320, not 1073"):
        dequantize_4bit(packed, state)
    same_size, other_blocks = quantize_4bit(torch.randn(64, 64), blocksize=128)
    _, state = quantize_4bit(torch.randn(64, 64), blocksize=128)
    state.blocksize = 64  # a state edited to another block size: 32 constants for 64 blocks
    with pytest.raises(ValueError, match=r"absmax\): 32, not 64"):
        dequantize_4bit(same_size, state)
    assert dequantize_4bit(same_size, other_blocks).shape == (64, 64)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, "float16"])
def test_dequantizing_to_a_dtype_that_is_not_a_float_dtype_is_refused(dtype):
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="decodes to a float dtype"):
        dequantize_4bit(packed, state, dtype)


def test_a_meta_tensor_is_refused_as_having_no_values():
    with pytest.raises(ValueError, match="meta device: it has no values"):
        quantize_4bit(torch.empty(64, 64, device="meta"))
