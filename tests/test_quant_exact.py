"""qlora's 4-bit and 8-bit quantization against bitsandbytes 0.50 (the peer oracle), bit for bit.

Inputs are fresh random tensors every run; the seed is printed in every failure
message and ``QLORA_TEST_SEED=<seed>`` replays it.

Dequantization oracle: bitsandbytes' portable reference
(``backends.default.ops._dequantize_4bit_compute``). Its native CPU kernel
disagrees with that reference (and with itself on CUDA) when the last dimension
is not a multiple of the blocksize or the tensor is 1-D, so we hold ours equal
to the native kernel wherever the native kernel agrees with the portable one,
and outright for shapes whose last dimension is a multiple of the blocksize.
The sign of a decoded zero is not compared (FP4 code 0b1000 gives -0.0 on some
bitsandbytes paths, +0.0 in its table).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

bnb_F = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default import ops as _bnb_default_ops  # noqa: E402
from bitsandbytes.backends.utils import _get_4bit_code  # noqa: E402

from qlora.quant import (  # noqa: E402
    BLOCKSIZES, NonFiniteError, QuantState, bits_per_parameter, dequantize_4bit, dynamic_code, quantize_4bit,
    quantize_blockwise,
)
from qlora.quant.blockwise import _codes_by_search  # noqa: E402
from qlora.quant.codebook import code_4bit  # noqa: E402

# bitsandbytes' portable dequantization, eager: the function its torch.compile wrapper wraps (compiling it
# costs seconds per shape and computes the same float32 products).
_dequantize_4bit_compute = getattr(_bnb_default_ops._dequantize_4bit_compute, "__wrapped__",
                                   _bnb_default_ops._dequantize_4bit_compute)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("QLORA_TEST_SEED", random.randrange(2**31)))


def _same_bits(ours: torch.Tensor, theirs: torch.Tensor, what: str, seed: int, signed_zero: bool = True) -> None:
    """Equal bit for bit; with ``signed_zero=False`` a zero may differ in sign only."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (
        f"{what}: {ours.dtype}{tuple(ours.shape)} vs {theirs.dtype}{tuple(theirs.shape)} (seed {seed})")
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs), f"{what}: values differ (seed {seed})"
        return
    a, b = ours.view(_INT_VIEW[ours.dtype]), theirs.view(_INT_VIEW[theirs.dtype])
    differ = a != b
    if not signed_zero:
        differ &= ~((ours == 0) & (theirs == 0))
    if differ.any():
        i = differ.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(differ.sum())} elements differ, first at {i}: "
                             f"{ours[tuple(i)].item()!r} vs {theirs[tuple(i)].item()!r} (seed {seed})")


def _bnb_portable(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' portable dequantization, with its own double-quant decoding."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, dtype)


def _bnb_native(packed: torch.Tensor, state, portable: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' native dequantization, less three quirks of its own (``portable``: its portable result):
    the output of a one-byte tensor is transposed by a backward-compat shim (and 3-D ones raise there), an
    even-length 1-D tensor comes back as ``[1, n]``, and on CPUs with AVX512-BF16 its bf16 conversion
    flushes subnormal results to zero (its portable path and qlora keep them)."""
    if packed.shape[0] == 1:
        return portable
    native = bnb_F.dequantize_4bit(packed, state).reshape(portable.shape)
    if native.dtype == torch.bfloat16:
        flushed = (native == 0) & (portable.abs() < torch.finfo(torch.bfloat16).tiny)
        native = torch.where(flushed, portable, native)
    return native


def _adversarial(quant_type: str, blocksize: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Blocks of: zeros, exact ties between code values, huge and tiny magnitudes,
    random values with negative zeros, all negative zeros; then a short tail."""
    huge, tiny = (6e4, 1e-7) if dtype == torch.float16 else (1e30, 1e-30)
    code = code_4bit(quant_type).double().sort().values.unique()
    mids = (code[:-1] + code[1:]) / 2
    scale = 2.0 ** torch.randint(-8, 9, (1,), generator=gen).item()  # powers of two keep x/absmax exact
    ties = torch.cat([mids, code, -mids, torch.tensor([1.0])]) * scale
    ties = ties[torch.randint(0, ties.numel(), (blocksize,), generator=gen)]
    ties[0] = scale  # the block absmax
    ties = ties.float()

    def rand(n: int) -> torch.Tensor:
        return torch.randn(n, generator=gen)

    with_negzero = rand(blocksize)
    with_negzero[torch.randint(0, blocksize, (blocksize // 4,), generator=gen)] = -0.0
    blocks = [
        torch.zeros(blocksize),
        ties,
        (torch.rand(blocksize, generator=gen) * 2 - 1) * huge,  # within float16's range
        rand(blocksize) * tiny,
        with_negzero,
        torch.full((blocksize,), -0.0),
    ]
    if dtype == torch.float32:
        blocks.append(rand(blocksize) * 1e-39)  # subnormal float32
    blocks.append(rand(5) * 0.5)
    return torch.cat(blocks).to(dtype)


def _check_against_bnb(w: torch.Tensor, quant_type: str, blocksize: int, dq: bool, seed: int) -> None:
    case = f"{quant_type} bs={blocksize} dq={dq} {w.dtype} {tuple(w.shape)}"
    bnb_p, bnb_s = bnb_F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    try:
        ours_p, ours_s = quantize_4bit(w, quant_type, blocksize, dq)
    except NonFiniteError as exc:
        # Refused only where the double-quantized constants would decode to infinity (bitsandbytes' do).
        near_max = w.float().abs().max() > 0.98 * torch.finfo(torch.float32).max
        assert dq and near_max and "double-quantize" in str(exc), f"{case}: {exc} (seed {seed})"
        assert not torch.isfinite(_bnb_portable(bnb_p, bnb_s, torch.float32)).all(), f"{case} (seed {seed})"
        return

    _same_bits(ours_p, bnb_p, f"packed bytes [{case}]", seed)
    if dq and not torch.isfinite(bnb_s.offset).all():
        _check_overflowed_offset(w, ours_p, ours_s, case, seed)
        return
    _same_bits(ours_s.absmax, bnb_s.absmax, f"absmax [{case}]", seed)
    if dq:
        _same_bits(ours_s.nested.absmax, bnb_s.state2.absmax, f"nested absmax [{case}]", seed)
        _same_bits(ours_s.offset.reshape(()), bnb_s.offset.reshape(()), f"offset [{case}]", seed)

    ours_d, bnb_d = ours_s.as_dict(packed=True), bnb_s.as_dict(packed=True)
    assert sorted(ours_d) == sorted(bnb_d), f"as_dict keys [{case}] (seed {seed})"
    for key, theirs in bnb_d.items():
        if key.startswith("quant_state."):
            mine = json.loads(bytes(ours_d[key].tolist()))
            assert mine == json.loads(bytes(theirs.tolist())), f"{key} [{case}] (seed {seed})"
        else:
            _same_bits(ours_d[key], theirs, f"as_dict[{key}] [{case}]", seed)

    ours_out = dequantize_4bit(ours_p, ours_s)
    portable = _bnb_portable(bnb_p, bnb_s, w.dtype)
    _same_bits(ours_out, portable, f"dequantized vs bnb portable [{case}]", seed, signed_zero=False)

    native = _bnb_native(bnb_p, bnb_s, portable)
    if w.dim() > 1 and w.shape[-1] % blocksize == 0:
        _same_bits(ours_out, native, f"dequantized vs bnb native [{case}]", seed, signed_zero=False)
    else:
        agree = (native == portable) & (native.view(_INT_VIEW[w.dtype]) == portable.view(_INT_VIEW[w.dtype]))
        _same_bits(ours_out[agree], native[agree], f"dequantized vs bnb native where it agrees [{case}]", seed,
                   signed_zero=False)

    # Cross decoding: bitsandbytes' state read by qlora, and qlora's state read by bitsandbytes.
    from_bnb = QuantState.from_dict(bnb_s.as_dict(packed=True), device="cpu")
    _same_bits(dequantize_4bit(bnb_p, from_bnb), portable, f"bnb-quantized decoded by qlora [{case}]", seed,
               signed_zero=False)
    to_bnb = bnb_F.QuantState.from_dict(ours_s.as_dict(packed=True), torch.device("cpu"))
    _same_bits(_bnb_portable(ours_p, to_bnb, w.dtype), ours_out, f"qlora-quantized decoded by bnb [{case}]", seed,
               signed_zero=False)
    if w.dim() > 1 and w.shape[-1] % blocksize == 0 and ours_p.shape[0] > 1:
        _same_bits(_bnb_native(ours_p, to_bnb, ours_out), ours_out,
                   f"qlora-quantized decoded by bnb native [{case}]", seed, signed_zero=False)


def _check_overflowed_offset(w: torch.Tensor, packed: torch.Tensor, state, case: str, seed: int) -> None:
    """bitsandbytes' float32 mean of the block absmax overflowed (constants near float32's maximum): its
    offset is infinite and its whole tensor decodes to NaN. qlora's offset is the float64 mean: finite,
    and bitsandbytes decodes qlora's state, bit for bit, to what qlora decodes, close to the weights."""
    assert torch.isfinite(state.offset) and torch.isfinite(state.nested.absmax).all(), f"{case} (seed {seed})"
    ours = dequantize_4bit(packed, state)
    plain_p, plain_s = quantize_4bit(w, state.quant_type, state.blocksize, double_quant=False)
    plain = dequantize_4bit(plain_p, plain_s).float()
    assert torch.isfinite(ours).all(), f"{case}: non-finite decode (seed {seed})"
    assert ((ours.float() - plain).abs() <= 0.01 * plain_s.absmax.max()).all(), f"{case} (seed {seed})"
    to_bnb = bnb_F.QuantState.from_dict(state.as_dict(packed=True), torch.device("cpu"))
    _same_bits(_bnb_portable(packed, to_bnb, w.dtype), ours, f"decoded by bnb [{case}]", seed, signed_zero=False)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_random_shapes_match_bitsandbytes(seed, dtype, dq, quant_type, blocksize):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, blocksize), (2, 3, blocksize + 5), (33, 257), (2 * blocksize + 7,), (7,), (1,)]
    for shape in shapes:
        w = (torch.randn(shape, generator=gen) * torch.rand(1, generator=gen) * 10).to(dtype)
        _check_against_bnb(w, quant_type, blocksize, dq, seed)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_adversarial_values_match_bitsandbytes(seed, dtype, dq, quant_type, blocksize):
    gen = torch.Generator().manual_seed(seed)
    flat = _adversarial(quant_type, blocksize, dtype, gen)
    _check_against_bnb(flat, quant_type, blocksize, dq, seed)
    # The same values as a matrix whose rows are whole blocks (the tail dropped).
    whole = flat[: flat.numel() // blocksize * blocksize].view(-1, blocksize)
    _check_against_bnb(whole, quant_type, blocksize, dq, seed)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_blockwise_8bit_matches_bitsandbytes_cpu(seed, dtype, blocksize):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * blocksize + 11, generator=gen) * 3
    x[:blocksize] = 0  # an all-zero block
    x[blocksize: blocksize + 8] = -0.0
    x = x.to(dtype)
    codes, absmax = quantize_blockwise(x, dynamic_code(signed=True), blocksize)
    bnb_codes, bnb_state = bnb_F.quantize_blockwise(x, blocksize=blocksize)
    _same_bits(codes, bnb_codes, f"8-bit codes bs={blocksize} {dtype}", seed)
    _same_bits(absmax, bnb_state.absmax, f"8-bit absmax bs={blocksize} {dtype}", seed)


@pytest.mark.parametrize("scale", [1e-39, 1e-42])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_subnormal_blocks_match_bitsandbytes(seed, dtype, scale):
    """Blocks whose absmax is subnormal: its reciprocal overflows to inf, so bitsandbytes codes their
    values as +-1 and their zeros (0 * inf = NaN) as -1. Reached by 8-bit optimizer moments of
    vanishing gradients, and by double quantization of a 4-bit tensor whose weights are all tiny."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * 256 + 11, generator=gen) * scale
    x[torch.randint(0, x.numel(), (40,), generator=gen)] = 0.0
    x = x.to(dtype)
    codes, absmax = quantize_blockwise(x, dynamic_code(signed=True), 256)
    bnb_codes, bnb_state = bnb_F.quantize_blockwise(x, blocksize=256)
    _same_bits(codes, bnb_codes, f"8-bit codes of {scale:g} {dtype}", seed)
    _same_bits(absmax, bnb_state.absmax, f"8-bit absmax of {scale:g} {dtype}", seed)
    for quant_type in ("nf4", "fp4"):
        _check_against_bnb(x.view(-1, 1), quant_type, 64, True, seed)  # the absmax vector is subnormal too


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_binary_search_codes_are_nearest(seed, signed):
    """The CUDA scheme (bitsandbytes' 7-step binary search over 256 sorted values)
    picks the nearest code value. Its search always ends on an even index and
    keeps it when the value sits exactly on a midpoint, so a tie goes to the
    even one of the two codes (not always the lower)."""
    gen = torch.Generator().manual_seed(seed)
    code = dynamic_code(signed=signed)
    c64 = code.double()
    mids64 = (c64[:-1] + c64[1:]) / 2
    exact = mids64.float().double() == mids64  # ties representable in float32
    low = -1.0 if signed else 0.0
    small = torch.randn(5000, generator=gen) * 1e-3  # the dense end of the dynamic code
    x = torch.cat([
        torch.rand(20000, generator=gen) * (1 - low) + low,
        small if signed else small.abs(),
        code, mids64[exact].float(), torch.tensor([low, 1.0]),
    ])
    got = _codes_by_search(x, code).long()
    dist = (x.double()[:, None] - c64[None, :]).abs()
    expected = dist.argmin(dim=1)
    # The search compares in float32: a value equal to a float32 midpoint of two codes is a tie there (the
    # appended exact midpoints, and any random value that lands on one), whichever code is nearer in exact
    # arithmetic when the midpoint itself is not representable.
    mids32 = (code[:-1] + code[1:]) / 2
    on_mid = x[:, None] == mids32[None, :]
    is_tie = on_mid.any(dim=1)
    tie_lower = on_mid.float().argmax(dim=1)[is_tie]
    expected[is_tie] = tie_lower + tie_lower % 2  # the even index of (i, i + 1)
    assert is_tie.sum() > 50, "too few exact ties to test the tie rule"
    bad = got != expected
    assert not bad.any(), (f"{int(bad.sum())} codes differ, e.g. x={x[bad][0].item()!r}: "
                           f"{got[bad][0].item()} vs {expected[bad][0].item()} (seed {seed})")


def test_bits_per_parameter():
    w = torch.randn(256, 1024)
    _, plain = quantize_4bit(w, "nf4", 64, double_quant=False)
    _, nested = quantize_4bit(w, "nf4", 64, double_quant=True)
    assert bits_per_parameter(plain) == 4.5
    offset_bits = 32 / w.numel()
    assert bits_per_parameter(nested) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + offset_bits, rel=1e-12)
    assert round(bits_per_parameter(nested), 3) == 4.127


@pytest.mark.parametrize(
    "kwargs, dtype, message",
    [
        ({"quant_type": "int4"}, torch.float32, "quant_type must be one of"),
        ({"quant_type": "nf8"}, torch.float32, "quant_type must be one of"),
        ({"blocksize": 48}, torch.float32, "blocksize must be one of"),
        ({"blocksize": 8192}, torch.float32, "blocksize must be one of"),
        ({}, torch.float64, "float32, float16 or bfloat16"),
        ({}, torch.int32, "float32, float16 or bfloat16"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, dtype, message):
    with pytest.raises(ValueError, match=message):
        quantize_4bit(torch.ones(64, 64).to(dtype), **kwargs)


def _fuzz_values(kind: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``n`` values of one adversarial kind, as ``dtype``."""
    r = torch.randn(n, generator=gen)
    if kind == "normal":
        return r.to(dtype)
    if kind == "scaled":  # any magnitude from 1e-6 to 1e6 (1e3 in float16, whose maximum is 65504)
        top = 3 if dtype == torch.float16 else 6
        return (r * 10.0 ** (torch.rand(1, generator=gen) * (top + 6) - 6)).to(dtype)
    if kind == "zeros":
        return torch.zeros(n, dtype=dtype)
    if kind == "constant":  # every block all-equal
        return torch.full((n,), (r[0] * 3).item()).to(dtype)
    if kind == "sparse":  # zeros, negative zeros and a few outliers among normal values
        r[torch.randint(0, n, (n // 4 + 1,), generator=gen)] = -0.0
        r[torch.randint(0, n, (n // 16 + 1,), generator=gen)] = 0.0
        r[torch.randint(0, n, (1,), generator=gen)] = 1e3
        return r.to(dtype)
    if kind == "ties":  # code values and midpoints of both codes, times a power of two: exact ties
        code = torch.cat([code_4bit("nf4"), code_4bit("fp4")]).double().unique()
        pool = torch.cat([code, (code[:-1] + code[1:]) / 2]).float()
        scale = 2.0 ** torch.randint(-12, 12, (1,), generator=gen).item()
        return (pool[torch.randint(0, pool.numel(), (n,), generator=gen)] * scale).to(dtype)
    if kind == "subnormal":
        return (r * torch.finfo(dtype).tiny * 2.0 ** -torch.randint(0, 8, (1,), generator=gen).item()).to(dtype)
    if kind == "near_max":  # up to the dtype's largest finite value
        return ((torch.rand(n, generator=gen) * 2 - 1) * torch.finfo(dtype).max).to(dtype)
    raise ValueError(kind)


FUZZ_KINDS = ("normal", "scaled", "zeros", "constant", "sparse", "ties", "subnormal", "near_max")


@pytest.mark.parametrize("part", range(4))
def test_seeded_fuzz_matches_bitsandbytes(seed, part):
    """A seeded random sweep: every block size, quant type, double quant and dtype, on shapes from one
    element to long rows (1-D, 2-D, 3-D, numel not a multiple of the block size), with the adversarial
    value kinds of :func:`_fuzz_values`."""
    rng = random.Random(seed * 4 + part)
    gen = torch.Generator().manual_seed(seed * 4 + part)
    for _ in range(40):
        blocksize = rng.choice(BLOCKSIZES)
        shape = rng.choice([
            (rng.randint(1, 4),), (rng.randint(1, 3 * blocksize),), (rng.randint(1, 12), rng.randint(1, 300)),
            (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 70)), (2, rng.randint(1, 200) * 128 + 1),
        ])
        n = int(torch.Size(shape).numel())
        w = _fuzz_values(rng.choice(FUZZ_KINDS), n, rng.choice(DTYPES), gen).reshape(shape)
        _check_against_bnb(w, rng.choice(["nf4", "fp4"]), blocksize, rng.random() < 0.5, seed * 4 + part)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_double_quant_offset_that_overflows_float32_stays_finite(seed, dtype):
    """Block constants near float32's maximum overflow bitsandbytes' float32 mean: its offset is
    infinite and the whole tensor decodes to NaN (checked here, so the case cannot pass unnoticed when
    bitsandbytes changes). qlora's state stays finite; see :func:`_check_overflowed_offset`."""
    gen = torch.Generator().manual_seed(seed)
    w = ((torch.rand(16, 256, generator=gen) * 2 - 1) * 3e38).to(dtype)
    for quant_type in ("nf4", "fp4"):
        bnb_p, bnb_s = bnb_F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert not torch.isfinite(bnb_s.offset).all() and bnb_F.dequantize_4bit(bnb_p, bnb_s).isnan().all()
        _check_against_bnb(w, quant_type, 64, True, seed)


def test_double_quant_refuses_constants_that_would_decode_to_infinity():
    """Float32 weights spread up to float32's maximum: bitsandbytes' offset overflows (all NaN). qlora's
    float64 offset is finite, but where a nested block's absmax is set by a low constant, a constant
    within ~1e-4 of the maximum can take an 8-bit code that rounds up, and ``code * nested_absmax +
    offset`` overflows: qlora refuses, naming the way out; without double quantization it matches."""
    gen = torch.Generator().manual_seed(0)  # fixed: this draw's block 334 is such a constant
    w = (torch.rand(2, 12033, generator=gen) * 2 - 1) * torch.finfo(torch.float32).max
    bnb_p, bnb_s = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert _bnb_portable(bnb_p, bnb_s, torch.float32).isnan().all()
    with pytest.raises(NonFiniteError, match=r"\(2, 12033\) tensor.*3\.403e\+38.*--no-double-quant"):
        quantize_4bit(w, "nf4", 64, double_quant=True)
    _check_against_bnb(w, "nf4", 64, False, 0)
