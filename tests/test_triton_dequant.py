"""The Triton dequantizer against the PyTorch reference, bit for bit.

Without a GPU the kernel runs in Triton's CPU interpreter. Triton reads
``TRITON_INTERPRET`` when a kernel is decorated (at import), so the interpreted
sweep runs in a subprocess that sets it first: ``python tests/test_triton_dequant.py``.
On a GPU the ``cuda`` tests compare the compiled kernel with the CPU reference
and with bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import run_interpreted
from qlora.quant import BLOCKSIZES, dequantize_4bit, quantize_4bit  # noqa: E402
from qlora.quant.fourbit import NonFiniteError  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_SHAPES = ((5, 123), (3001,), (2, 4101), (1,), (64, 64))


def _reference(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The PyTorch reference on the CPU, whatever the device of the inputs."""
    return dequantize_4bit(packed.cpu(), state.to("cpu"), dtype)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.cpu().view(_INT_VIEW[a.dtype]), b.cpu().view(_INT_VIEW[b.dtype]))


def _interpreted_sweep(seed: int) -> list[str]:
    """Every (dtype, DQ, quant type, blocksize, shape) case that disagrees with the reference."""
    from qlora.quant.kernels import triton_dequant

    assert triton_dequant.available()
    gen = torch.Generator().manual_seed(seed)
    failures = []
    for dtype in DTYPES:
        for dq in (True, False):
            for quant_type in ("nf4", "fp4"):
                for blocksize in (32, 64, 256, 4096):
                    for shape in _SHAPES[:-1]:
                        w = (torch.randn(shape, generator=gen) * 3).to(dtype)
                        if shape == (3001,):  # zeros, subnormals and values near the dtype's maximum
                            w[:100] = 0.0
                            w[100:400] *= torch.finfo(dtype).tiny
                            w[400:800] = (w[400:800] / 6).clamp(-1, 1) * torch.finfo(dtype).max
                        try:
                            packed, state = quantize_4bit(w, quant_type, blocksize, dq)
                        except NonFiniteError:  # constants within ~1e-4 of float32's maximum: refused, not decoded
                            assert dq and shape == (3001,)
                            continue
                        if shape == (5, 123):  # packed bytes stored as float elements (quant_storage)
                            packed = packed.reshape(-1).view(dtype).unsqueeze(1)
                        for out_dtype in {dtype, torch.float32}:
                            ours = triton_dequant.dequantize_4bit(packed, state, out_dtype)
                            if not _bits_equal(ours, _reference(packed, state, out_dtype)):
                                failures.append(f"{dtype}->{out_dtype} dq={dq} {quant_type} bs={blocksize} {shape}")
    return failures


def test_interpreted_kernel_matches_reference():
    seed = random.randrange(2**31)
    done = run_interpreted(__file__, str(seed), timeout=600)
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "all cases bit-exact" in done.stdout


def test_available_follows_device_or_interpreter(monkeypatch):
    from qlora.quant.kernels import triton_dequant

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_dequant.available()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_dequant.available()


def test_kernel_compiles_for_h100_without_fused_multiply_add():
    """Compile (no GPU needed) for sm_90 and check no FMA merged the absmax decoding."""
    import triton
    from triton.backends.compiler import GPUTarget

    from qlora.quant.kernels import triton_dequant

    signature = {
        "packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "out_ptr": "*bf16",
        "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
        "n_bytes": "i32", "n_out": "i32", "BLOCK_SHIFT": "constexpr", "NESTED_SHIFT": "constexpr",
        "DOUBLE_QUANT": "constexpr", "BYTES": "constexpr",
    }
    constants = {"BLOCK_SHIFT": 6, "NESTED_SHIFT": 8, "DOUBLE_QUANT": True, "BYTES": 1024}
    source = triton.compiler.ASTSource(fn=triton_dequant._dequant_kernel, signature=signature, constexprs=constants)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas/LLVM backend in this Triton build
        pytest.skip(f"cannot compile for CUDA here: {exc}")
    ptx = kernel.asm["ptx"]
    assert "fma" not in ptx


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_dequantize_matches_cpu_reference(dtype, quant_type, dq, blocksize):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    for shape in _SHAPES + ((4096, 4096),):
        w = torch.randn(shape, generator=gen).to(dtype)
        # Quantized on the CPU, decoded on the GPU.
        packed, state = quantize_4bit(w, quant_type, blocksize, dq)
        got = dequantize_4bit(packed.cuda(), state.to("cuda"))
        assert got.is_cuda and _bits_equal(got, _reference(packed, state, dtype)), f"{shape} (seed {seed})"
        # Quantized and decoded on the GPU.
        packed, state = quantize_4bit(w.cuda(), quant_type, blocksize, dq)
        got = dequantize_4bit(packed, state)
        assert _bits_equal(got, _reference(packed, state, dtype)), f"{shape} on CUDA (seed {seed})"


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cuda_matches_bitsandbytes_cuda(dtype, quant_type, dq, blocksize):
    bnb_F = pytest.importorskip("bitsandbytes.functional")
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    for shape in _SHAPES + ((4096, 4096),):
        w = torch.randn(shape, generator=gen).to(dtype).cuda()
        packed, state = quantize_4bit(w, quant_type, blocksize, dq)
        bnb_packed, bnb_state = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                    compress_statistics=dq)
        case = f"{dtype} {quant_type} dq={dq} bs={blocksize} {shape} (seed {seed})"
        assert torch.equal(packed, bnb_packed), f"packed bytes {case}"
        assert torch.equal(state.absmax, bnb_state.absmax), f"absmax {case}"
        if dq:
            assert _bits_equal(state.nested.absmax, bnb_state.state2.absmax), f"nested absmax {case}"
            assert _bits_equal(state.offset.reshape(()), bnb_state.offset.reshape(())), f"offset {case}"
        ours, theirs = dequantize_4bit(packed, state), bnb_F.dequantize_4bit(bnb_packed, bnb_state)
        differ = (ours.view(_INT_VIEW[dtype]) != theirs.view(_INT_VIEW[dtype])) & ~((ours == 0) & (theirs == 0))
        assert not differ.any(), f"dequantized: {int(differ.sum())} differ {case}"


if __name__ == "__main__":  # the interpreted sweep, run by test_interpreted_kernel_matches_reference
    bad = _interpreted_sweep(int(sys.argv[1]))
    print("\n".join(bad) if bad else "all cases bit-exact")
    sys.exit(1 if bad else 0)
