"""The compiled CPU dequantizer is the reference bit for bit, and is what large CPU tensors take.

Compiling costs seconds, so one signature is compiled here (bf16 output, double
quantization: the default weight layout) and the other outputs reuse it only
where the graph is the same.
"""

from __future__ import annotations

import pytest
import torch

from qlora.quant import dequantize_4bit, quantize_4bit
from qlora.quant.double_quant import decompress_absmax
from qlora.quant.kernels import compiled_cpu, torch_ref

bnb_F = pytest.importorskip("bitsandbytes.functional")
from test_quant_exact import _bnb_portable  # noqa: E402


def _eager(packed, state, dtype):
    absmax = decompress_absmax(state.absmax, state.offset, state.nested) if state.nested else state.absmax
    return torch_ref.dequantize_4bit_ref(packed, absmax, state.blocksize, state.quant_type, state.shape, dtype)


@pytest.mark.slow
def test_compiled_dequantize_is_bit_exact_and_taken_for_large_tensors(monkeypatch):
    calls = []
    real = compiled_cpu.dequantize
    monkeypatch.setattr(compiled_cpu, "dequantize", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(1024, 1088, generator=gen) * 3).bfloat16()  # 1.1M elements: above the threshold
    w[0, :64] = 0  # an all-zero block
    for quant_type, blocksize in (("nf4", 64), ("fp4", 256)):
        packed, state = quantize_4bit(w, quant_type, blocksize, True)
        out = dequantize_4bit(packed, state)
        assert calls, "a large CPU tensor should take the compiled path"
        assert torch.equal(out.view(torch.int16), _eager(packed, state, torch.bfloat16).view(torch.int16))
        bnb_p, bnb_s = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        # bitsandbytes' portable reference, the oracle of test_quant_exact: its native CPU kernel rounds absmax to
        # bf16 on AVX512-BF16 machines, and gives -0.0 where the table says +0.0 (torch.equal ignores the sign)
        assert torch.equal(out, _bnb_portable(bnb_p, bnb_s, torch.bfloat16))
        calls.clear()
    small_p, small_s = quantize_4bit(w[:8], "nf4", 64, True)
    dequantize_4bit(small_p, small_s)
    assert not calls  # small tensors stay eager: compiling would cost more than it saves


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    packed, state = quantize_4bit(torch.randn(64, 64), "nf4", 64, True)

    def broken(nested):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_cpu, "_compiled", broken)
    monkeypatch.setattr(compiled_cpu, "_failed", False)
    monkeypatch.setattr(compiled_cpu, "MIN_ELEMENTS", 1)
    with pytest.warns(RuntimeWarning, match="compiling the CPU dequantizer failed"):
        out = dequantize_4bit(packed, state)
    assert torch.equal(out, _eager(packed, state, torch.float32))
    assert not compiled_cpu.supports(packed, 64 * 64, 64)  # not tried again
