"""The fused 4-bit GEMV against ``x.float() @ dequantize_4bit(W, float32).T``.

Without a GPU the kernel runs in Triton's CPU interpreter, in a subprocess
(Triton reads ``TRITON_INTERPRET`` at import): ``python tests/test_triton_gemv.py SEED``.

Tolerance: the kernel accumulates in float32 and scales once per group of 64
weights instead of once per weight, so against the float32 reference only
summation order differs: ‖y − ref‖ / ‖ref‖ < 1e-5 for float32 output. A 16-bit
output adds one rounding of each element (half an ulp: 2^-9 relative for
bfloat16, 2^-12 for float16; the interpreter truncates bfloat16, a full ulp),
so those outputs pass elementwise within 2^-7 (bf16) or 2^-10 (fp16) of |ref|
plus the float32 allowance.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import run_interpreted
from qlora.quant import dequantize_4bit, quantize_4bit  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ULP = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# (N, K, blocksize, rows, config): odd N; K a multiple of the group but not of
# BLOCK_K (192, 320); split-K with a ragged last split; blocksize 32 and 4096.
_CASES = (
    (37, 192, 64, 1, None),
    (5, 320, 64, 3, (4, 128, 2)),
    (19, 640, 32, 2, (8, 256, 3)),
    (3, 256, 4096, 4, (4, 64, 2)),
    (1, 64, 128, 1, None),
)


def _reference(x: torch.Tensor, packed: torch.Tensor, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact product, and sum_k |x_k w_k| per output: the scale of its float32 summation error."""
    w = dequantize_4bit(packed.cpu(), state.to("cpu"), torch.float32).double()
    x = x.cpu().double()
    return x @ w.T, x.abs() @ w.abs().T


def _check(y: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> str | None:
    """None when ``y`` (in ``dtype``) matches the reference within the docstring's tolerance.

    A float32 sum in another order differs by up to about K * 2^-24 * sum|x w|: an output that cancels
    (small against its terms, e.g. one output of K = 64) is judged against that scale, not its own size.
    """
    ref, scale = reference
    if y.dtype != dtype or y.shape != ref.shape:
        return f"got {y.dtype} {tuple(y.shape)}"
    y = y.cpu().double()
    if not torch.isfinite(y).all():
        return "non-finite output"
    rel = ((y - ref).norm() / ref.norm()).item()
    if rel > 1e-5:
        # 16-bit outputs: each element within its rounding of the float32 result.
        bound = _ULP[dtype] * ref.abs() + 1e-5 * ref.norm() / ref.numel() ** 0.5 + 2.0**-24 * scale.shape[-1] * scale
        if not ((y - ref).abs() <= bound).all():
            return f"relative error {rel:.2e}"
    return None


def _sweep(seed: int, device: str) -> list[str]:
    """Every (dtype, DQ, quant type, case) on ``device`` that misses the reference."""
    from qlora.quant.kernels.triton_gemv import GemvConfig, gemv_4bit

    gen = torch.Generator().manual_seed(seed)
    failures = []
    for dtype in DTYPES:
        for dq in (True, False):
            for quant_type in ("nf4", "fp4"):
                for n, k, blocksize, rows, cfg in _CASES:
                    w = torch.randn(n, k, generator=gen) * 0.05
                    packed, state = quantize_4bit(w.to(device), quant_type, blocksize, dq)
                    x = torch.randn(rows, k, generator=gen).to(dtype)
                    config = GemvConfig(*cfg) if cfg else None
                    y = gemv_4bit(x.to(device), packed, state, config=config)
                    why = _check(y, _reference(x, packed, state), dtype)
                    if why:
                        failures.append(f"{dtype} dq={dq} {quant_type} N={n} K={k} bs={blocksize} M={rows} {cfg}: {why}")
    return failures


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a buffer twice as long)."""
    buf = torch.empty(t.numel() * 2, dtype=t.dtype, device=t.device)
    view = buf[::2]
    view.copy_(t.reshape(-1))
    return view.reshape(t.shape) if t.dim() == 1 else view


def _strided_state_failures(device: str) -> list[str]:
    """gemv_4bit with absmax, code book and nested tensors that are strided views."""
    from dataclasses import replace

    from qlora.quant import NestedState
    from qlora.quant.kernels.triton_gemv import gemv_4bit

    gen = torch.Generator().manual_seed(7)
    failures = []
    for dq in (True, False):
        w = torch.randn(24, 256, generator=gen) * 0.05
        packed, state = quantize_4bit(w.to(device), "nf4", 64, dq)
        nested = state.nested and NestedState(_strided(state.nested.absmax), _strided(state.nested.code),
                                              state.nested.blocksize, state.nested.dtype)
        strided = replace(state, absmax=_strided(state.absmax), code=_strided(state.code), nested=nested)
        assert not strided.absmax.is_contiguous() and not strided.code.is_contiguous()
        x = torch.randn(2, 256, generator=gen).to(device)
        why = _check(gemv_4bit(x, packed, strided), _reference(x, packed, state), torch.float32)
        if why:
            failures.append(f"strided state dq={dq}: {why}")
    return failures


def test_interpreted_kernel_matches_reference():
    seed = random.randrange(2**31)
    done = run_interpreted(__file__, str(seed), timeout=300)
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "all cases within tolerance" in done.stdout


def test_config_fills_the_machine():
    from qlora.quant.kernels.triton_gemv import choose_config

    # On the CPU the SM count is an H100's 132.
    big = choose_config(28672, 8192, torch.device("cpu"))
    assert (big.block_n, big.split_k) == (16, 1)
    kv = choose_config(1024, 4096, torch.device("cpu"))
    assert kv.block_n * kv.block_k == 8192 and -(-1024 // kv.block_n) >= 132
    tiny_n = choose_config(64, 8192, torch.device("cpu"))
    assert tiny_n.split_k > 1 and tiny_n.split_k * tiny_n.block_k <= 8192  # no empty splits


def test_rejects_layouts_it_cannot_take():
    from qlora.quant.kernels.triton_gemv import gemv_4bit, supports

    assert supports(4096, 64) and supports(96, 32) and not supports(96, 64) and not supports(100, 4096)
    packed, state = quantize_4bit(torch.randn(4, 96), "nf4", 64, True)
    with pytest.raises(ValueError, match="multiple"):
        gemv_4bit(torch.randn(1, 96), packed, state)
    packed, state = quantize_4bit(torch.randn(4, 128), "nf4", 64, True)
    with pytest.raises(ValueError, match="rows"):
        gemv_4bit(torch.randn(5, 128), packed, state)


def test_kernel_compiles_for_h100_with_16_byte_loads():
    """Compile (no GPU needed) for sm_90: the packed bytes must load 16 bytes at a time."""
    import triton
    from triton.backends.compiler import GPUTarget

    from qlora.quant.kernels import triton_gemv

    pointers = {"x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32",
                "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*bf16"}
    ints = {name: "i32" for name in ("N", "K", "k_per_split", "stride_xm", "stride_om", "stride_os")}
    constants = {"M": 1, "M_PAD": 1, "BLOCK_N": 16, "BLOCK_K": 512, "GROUP": 64, "BLOCK_SHIFT": 6,
                 "NESTED_SHIFT": 8, "DOUBLE_QUANT": True}
    signature = {**pointers, **ints, **{name: "constexpr" for name in constants}}
    # As the launcher specializes them for the decode shapes: pointers 16-byte aligned, sizes multiples of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(ints))}
    source = triton.compiler.ASTSource(fn=triton_gemv._gemv_4bit_kernel, signature=signature,
                                       constexprs=constants, attrs=attrs)
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas/LLVM backend in this Triton build
        pytest.skip(f"cannot compile for CUDA here: {exc}")
    ptx = kernel.asm["ptx"]
    assert "ld.global.v4.b32" in ptx
    assert "ld.local" not in ptx and "st.local" not in ptx  # nothing spilled to local memory


@pytest.mark.cuda
def test_cuda_kernel_matches_reference():
    bad = _sweep(random.randrange(2**31), "cuda") + _strided_state_failures("cuda")
    assert not bad, "\n".join(bad)


@pytest.mark.cuda
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("rows", [1, 4])
def test_cuda_decode_shapes_match_reference(n, k, rows):
    from qlora.quant.kernels.triton_gemv import gemv_4bit

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = quantize_4bit(w, "nf4", 64, True)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    why = _check(gemv_4bit(x, packed, state), _reference(x, packed, state), torch.bfloat16)
    assert why is None, why


@pytest.mark.cuda
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_linear4bit_dispatches_to_gemv(dq, bias, monkeypatch):
    """Inference with <= 4 rows takes the fused GEMV and computes what the reference path computes
    (to the bf16 rounding of the dequantized weight the reference multiplies with)."""
    from qlora.nn import Linear4bit
    from qlora.quant.kernels import triton_gemv

    dense = torch.nn.Linear(4096, 1000, bias=bias, device="cuda")
    layer = Linear4bit.from_linear(dense, double_quant=dq)
    calls, real = [], triton_gemv.gemv_4bit
    monkeypatch.setattr(triton_gemv, "gemv_4bit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(1, 3, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = layer(x)
    assert calls and fused.shape == (1, 3, 1000) and fused.dtype == torch.bfloat16
    reference = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32),
                                           None if layer.bias is None else layer.bias.float())
    assert ((fused.float() - reference).norm() / reference.norm()).item() < 4e-3
    calls.clear()
    with torch.no_grad():
        layer(torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16))  # 5 rows: reference path
    layer(torch.randn(1, 4096, device="cuda", requires_grad=True))  # autograd needed: reference path
    assert not calls


if __name__ == "__main__":  # the interpreted sweep, run by test_interpreted_kernel_matches_reference
    bad = _sweep(int(sys.argv[1]), "cpu") + _strided_state_failures("cpu")
    print("\n".join(bad) if bad else "all cases within tolerance")
    sys.exit(1 if bad else 0)
