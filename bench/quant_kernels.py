"""qlora vs bitsandbytes: 4-bit quantize, dequantize and batch-1 GEMV (NF4, double quantization, block 64, bf16).

GPU (default): 4096x4096, 14336x4096 and 28672x8192, timed with CUDA events
after a warmup, median of the repeats; throughput counts the bytes a
dequantize must move (packed bytes + absmax codes read, bf16 written) and a
quantize (bf16 read, packed bytes + absmax codes written).
On the GPU a GEMV table follows: ``y = x @ W^T`` for one bf16 input row,
qlora's fused 4-bit GEMV against ``bitsandbytes.matmul_4bit`` (whose batch-1
path is its ``gemv_4bit``, as in ``bnb.nn.Linear4bit``) and torch's bf16 GEMV
(``F.linear`` with a dense bf16 weight); its TB/s counts the weight bytes read (packed + absmax codes for 4-bit, 2 a weight for bf16). Each call gets
another of several weight copies in turn, so the L2 cache (50 MB) never holds
the weight it reads.
CPU (``--device cpu``): 4096x4096, wall-clock median.

    python bench/quant_kernels.py                 # on a CUDA machine
    python bench/quant_kernels.py --device cpu
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import bitsandbytes
import bitsandbytes.functional as bnb_F
from qlora.quant import dequantize_4bit, quantize_4bit
from qlora.quant.kernels.triton_gemv import gemv_4bit

GPU_SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192))
CPU_SHAPES = ((4096, 4096),)


def _time_us(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _median_pair_us(ours: Callable[[], object], theirs: Callable[[], object], device: str,
                    warmup: int, repeats: int) -> tuple[float, float]:
    """Medians of alternating runs, so both sides see the same machine load."""
    for _ in range(warmup):
        ours()
        theirs()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(_time_us(ours, device))
        times[1].append(_time_us(theirs, device))
    return statistics.median(times[0]), statistics.median(times[1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench(device: str, shapes: tuple[tuple[int, int], ...], warmup: int, repeats: int) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_model()
    print(f"device: {name}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"threads {torch.get_num_threads()}; NF4, double quant, block 64, bf16; median of {repeats}")
    unit, scale = ("TB/s", 1e6) if device == "cuda" else ("GB/s", 1e3)  # bytes per µs -> unit
    print(f"{'shape':<13}{'op':<11}{'qlora µs':>11}{'bnb µs':>11}{'qlora ' + unit:>12}{'bnb ' + unit:>10}"
          f"{'qlora/bnb speed':>17}")
    for rows, cols in shapes:
        w = torch.randn(rows, cols, device=device).to(torch.bfloat16)
        packed, state = quantize_4bit(w, "nf4", 64, True)
        bnb_packed, bnb_state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        four_bit_bytes = packed.numel() + state.absmax.numel()  # packed codes + 8-bit absmax codes
        cases = {
            "dequantize": (lambda: dequantize_4bit(packed, state),
                           lambda: bnb_F.dequantize_4bit(bnb_packed, bnb_state), four_bit_bytes + 2 * w.numel()),
            "quantize": (lambda: quantize_4bit(w, "nf4", 64, True),
                         lambda: bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                         2 * w.numel() + four_bit_bytes),
        }
        for op, (ours, theirs, nbytes) in cases.items():
            t_ours, t_bnb = _median_pair_us(ours, theirs, device, warmup, repeats)
            print(f"{f'{rows}x{cols}':<13}{op:<11}{t_ours:>11.1f}{t_bnb:>11.1f}{nbytes / t_ours / scale:>12.3f}"
                  f"{nbytes / t_bnb / scale:>10.3f}{t_bnb / t_ours:>16.2f}x")


def _rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One callable that runs the next of ``fns`` each time (a cold weight per call)."""
    state = {"i": 0}

    def call() -> object:
        state["i"] = (state["i"] + 1) % len(fns)
        return fns[state["i"]]()

    return call


def bench_gemv(shapes: tuple[tuple[int, int], ...], warmup: int, repeats: int) -> None:
    """Batch-1 GEMV: qlora fused 4-bit vs bitsandbytes 4-bit vs torch bf16, alternating calls."""
    print(f"\nGEMV, one bf16 row; median of {repeats}")
    print(f"{'shape':<13}{'qlora µs':>10}{'bnb µs':>10}{'bf16 µs':>10}{'qlora TB/s':>12}{'bf16 TB/s':>11}"
          f"{'vs bnb':>9}{'vs bf16':>9}")
    for rows, cols in shapes:
        copies = max(2, -(-200 * 2**20 // (2 * rows * cols)))  # > 4x the L2 in bf16 weights
        x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        ours, theirs, dense = [], [], []
        for _ in range(copies):
            w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
            packed, state = quantize_4bit(w, "nf4", 64, True)
            bnb_packed, bnb_state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            ours.append(lambda p=packed, s=state: gemv_4bit(x, p, s))
            theirs.append(lambda p=bnb_packed, s=bnb_state: bitsandbytes.matmul_4bit(x, p.t(), quant_state=s))
            dense.append(lambda w=w: F.linear(x, w))
        ref = x.float() @ dequantize_4bit(packed, state, torch.float32).T
        err = ((ours[-1]().float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"fused GEMV off by {err:.2e} on {rows}x{cols}"
        t_ours, t_bnb = _median_pair_us(_rotating(ours), _rotating(theirs), "cuda", warmup, repeats)
        t_dense, _ = _median_pair_us(_rotating(dense), _rotating(ours), "cuda", warmup, repeats)
        four_bit_bytes = packed.numel() + state.absmax.numel()
        print(f"{f'{rows}x{cols}':<13}{t_ours:>10.1f}{t_bnb:>10.1f}{t_dense:>10.1f}{four_bit_bytes / t_ours / 1e6:>12.3f}"
              f"{2 * rows * cols / t_dense / 1e6:>11.3f}{t_bnb / t_ours:>8.2f}x{t_dense / t_ours:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 100 on GPU, 10 on CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    gpu = args.device == "cuda"
    repeats = args.repeats or (100 if gpu else 10)
    bench(args.device, GPU_SHAPES if gpu else CPU_SHAPES, warmup=10 if gpu else 2, repeats=repeats)
    if gpu:
        bench_gemv(GPU_SHAPES, warmup=10, repeats=repeats)


if __name__ == "__main__":
    main()
