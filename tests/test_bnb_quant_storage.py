"""4-bit layers in every ``quant_storage`` dtype against bitsandbytes, both ways, bit for bit.

transformers' ``bnb_4bit_quant_storage`` (FSDP-QLoRA) stores the packed bytes as bf16/fp16/fp32
elements. A bitsandbytes ``Linear4bit`` state dict in that storage must load into qlora's
``Linear4bit`` and decode to bitsandbytes' values, and qlora's state dict (its bytes viewed in that
storage) must load through ``Params4bit.from_prequantized`` and decode to qlora's values.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.backends.default import ops as _bnb_default_ops  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

from qlora.nn import Linear4bit  # noqa: E402

# bitsandbytes' portable dequantization, eager: the function its torch.compile wrapper wraps (compiling it
# costs seconds per shape and computes the same float32 products).
_dequantize_4bit_compute = getattr(_bnb_default_ops._dequantize_4bit_compute, "__wrapped__",
                                   _bnb_default_ops._dequantize_4bit_compute)

STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bnb_decode(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' portable dequantization of a (possibly double-quantized) state."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax.float(), code, state.blocksize,
                                    state.shape, dtype)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    differ = (a.view(_INT_VIEW[a.dtype]) != b.view(_INT_VIEW[b.dtype])) & ~((a == 0) & (b == 0))
    assert not differ.any(), f"{what}: {int(differ.sum())} of {a.numel()} values differ"


@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", STORAGES, ids=lambda d: str(d).removeprefix("torch."))
def test_quant_storage_state_dicts_load_both_ways(storage, quant_type, dq):
    seed = int(os.environ.get("QLORA_TEST_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # Shapes whose packed byte count fills whole storage elements (bitsandbytes cannot store others).
    shapes = [(1, 8), (3, 40), (5, 136), (16, 64 * 5 + 8), (300, 3 * 256 + 8)]
    for out_f, in_f in shapes:
        blocksize = rng.choice((32, 64, 128, 256, 1024, 4096))
        dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16))
        case = f"{quant_type} dq={dq} {storage} bs={blocksize} {dtype} {out_f}x{in_f} (seed {seed})"
        w = (torch.randn(out_f, in_f, generator=gen) * 3).to(dtype)

        theirs = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=dq,
                                   quant_type=quant_type, quant_storage=storage)._quantize("cpu")
        assert theirs.data.dtype == storage
        expected = _bnb_decode(theirs.data, theirs.quant_state, dtype)
        state_dict = {"weight": theirs.data, **{f"weight.{k}": v
                                                for k, v in theirs.quant_state.as_dict(packed=True).items()}}
        ours = Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype)  # nf4, block 64, dq: the state decides
        ours.load_state_dict(state_dict)
        _assert_same_bits(ours.dequantize(dtype), expected, f"bitsandbytes' state dict read by qlora [{case}]")

        mine = Linear4bit(in_f, out_f, bias=False, compute_dtype=dtype, quant_type=quant_type, blocksize=blocksize,
                          double_quant=dq)
        mine.set_weight(w)
        saved = mine.state_dict()
        assert saved["weight"].dtype == torch.uint8
        _assert_same_bits(mine.dequantize(dtype), expected, f"qlora's quantization [{case}]")
        stats = {k.removeprefix("weight."): v for k, v in saved.items() if k.startswith("weight.")}
        data = saved["weight"].reshape(-1).view(storage).unsqueeze(1)
        loaded = bnb.nn.Params4bit.from_prequantized(data, stats, device="cpu")
        _assert_same_bits(_bnb_decode(loaded.data, loaded.quant_state, dtype), mine.dequantize(dtype),
                          f"qlora's state dict read by bitsandbytes [{case}]")
