"""qlora vs bitsandbytes: 4-bit quantize, dequantize and batch-1 GEMV (NF4, double quantization, block 64, bf16).

How it times (GPU, the default): each measurement is ``--calls`` back-to-back
calls, captured in one CUDA graph and replayed (so launch latency and Python
overhead are not what is measured; when a side cannot be captured it runs the
same calls eagerly between two events and the table says ``eager``); the time
per call is the replay's time divided by the calls, and the table shows the
median of ``--repeats`` replays, qlora and bitsandbytes alternating so both
see the same clocks. Consecutive calls read different copies of the weight,
enough copies that the bytes the op reads (the 4-bit bytes for dequantize and
GEMV, the bf16 bytes for quantize) fill at least four L2 caches: no call finds
its input in L2. Throughput counts the bytes an op must move: dequantize
reads packed + absmax codes and writes bf16; quantize the reverse; GEMV reads
the weight (packed + absmax codes for 4-bit, 2 bytes a weight for bf16).

Shapes: 4096x4096, 14336x4096, 28672x8192; then a GEMV table (one bf16 row:
qlora's fused 4-bit GEMV, ``bitsandbytes.matmul_4bit`` and torch's bf16
``F.linear``).

CPU (``--device cpu``): 4096x4096 by default, the same back-to-back loop timed
with ``perf_counter``; the first (untimed) call of the compiled dequantizer
includes its one-time compilation, printed apart.

    python bench/quant_kernels.py                          # on a CUDA machine
    python bench/quant_kernels.py --device cpu
    python bench/quant_kernels.py --device cpu --shape 512x512 --repeats 3   # smoke
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

GPU_SHAPES = ((4096, 4096), (14336, 4096), (28672, 8192))
CPU_SHAPES = ((4096, 4096),)
_L2_FALLBACK = 50 * 2**20  # H100


def l2_bytes() -> int:
    if not torch.cuda.is_available():
        return _L2_FALLBACK
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or _L2_FALLBACK


def copies_needed(bytes_per_copy: int, cache_bytes: int, factor: int = 4, at_least: int = 2) -> int:
    """Copies of an input so that reading them in turn streams ``factor`` times the cache."""
    return max(at_least, -(-factor * cache_bytes // max(1, bytes_per_copy)))


class Rotation:
    """Runs ``fns[i]`` for i = 0, 1, ... in turn: each call a different (cold) input."""

    def __init__(self, fns: list[Callable[[], object]]) -> None:
        self.fns, self.i = fns, 0

    def __call__(self) -> object:
        fn = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return fn()


class Timer:
    """Per-call time of ``calls`` back-to-back calls of ``fn`` (µs)."""

    def __init__(self, fn: Callable[[], object], device: str, calls: int, graphs: bool) -> None:
        self.fn, self.device, self.calls = fn, device, calls
        self.graph = self._capture() if graphs and device == "cuda" else None

    @property
    def mode(self) -> str:
        return "graph" if self.graph is not None else ("eager" if self.device == "cuda" else "wall")

    def _capture(self) -> torch.cuda.CUDAGraph | None:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up on a side stream, as capture requires
                for _ in range(self.calls):
                    self.fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.calls):
                    self.fn()
            return graph
        except Exception:  # noqa: BLE001 - a side that cannot be captured is timed eagerly
            torch.cuda.synchronize()
            return None

    def __call__(self) -> float:
        if self.device != "cuda":
            t0 = time.perf_counter()
            for _ in range(self.calls):
                self.fn()
            return (time.perf_counter() - t0) * 1e6 / self.calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            for _ in range(self.calls):
                self.fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / self.calls


def median_pair_us(ours: Timer, theirs: Timer, repeats: int) -> tuple[float, float]:
    """Medians of alternating measurements, so both sides see the same machine state."""
    ours(), theirs()  # warm (and, for compiled paths, compile) outside the measurement
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(ours())
        times[1].append(theirs())
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


def bench(device: str, shapes: tuple[tuple[int, int], ...], repeats: int, calls: int, graphs: bool) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_model()
    cache = l2_bytes() if device == "cuda" else 0
    print(f"device: {name}; torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
          f"threads {torch.get_num_threads()}; NF4, double quant, block 64, bf16; "
          f"{calls} back-to-back calls a measurement, median of {repeats}"
          + (f"; inputs rotated over > 4x L2 ({cache / 2**20:.0f} MiB)" if device == "cuda" else ""))
    unit, scale = ("TB/s", 1e6) if device == "cuda" else ("GB/s", 1e3)  # bytes per µs -> unit
    print(f"{'shape':<13}{'op':<11}{'qlora µs':>11}{'bnb µs':>11}{'qlora ' + unit:>12}{'bnb ' + unit:>10}"
          f"{'qlora/bnb speed':>17}{'timing':>14}")
    for rows, cols in shapes:
        four_bit_bytes = rows * cols // 2 + rows * cols // 64  # packed codes + 8-bit absmax codes
        n_deq = copies_needed(four_bit_bytes, cache) if device == "cuda" else 1
        n_q = copies_needed(2 * rows * cols, cache) if device == "cuda" else 1
        weights = [torch.randn(rows, cols, device=device).to(torch.bfloat16) for _ in range(max(n_deq, n_q))]
        ours_q = [quantize_4bit(w, "nf4", 64, True) for w in weights[:n_deq]]
        bnb_q = [bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                 for w in weights[:n_deq]]
        t0 = time.perf_counter()
        first = dequantize_4bit(*ours_q[0])
        if device == "cpu":  # bit-exact with bitsandbytes' CPU kernel, and the one-time compile cost
            assert torch.equal(first.view(torch.int16), bnb_F.dequantize_4bit(*bnb_q[0]).view(torch.int16))
            print(f"({rows}x{cols}: first dequantize call, compiling included: {time.perf_counter() - t0:.1f} s)")
        cases = {
            "dequantize": ([lambda p=p, s=s: dequantize_4bit(p, s) for p, s in ours_q],
                           [lambda p=p, s=s: bnb_F.dequantize_4bit(p, s) for p, s in bnb_q],
                           four_bit_bytes + 2 * rows * cols),
            "quantize": ([lambda w=w: quantize_4bit(w, "nf4", 64, True) for w in weights[:n_q]],
                         [lambda w=w: bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                          for w in weights[:n_q]],
                         2 * rows * cols + four_bit_bytes),
        }
        for op, (ours, theirs, nbytes) in cases.items():
            t_ours, t_bnb = Timer(Rotation(ours), device, calls, graphs), Timer(Rotation(theirs), device, calls, graphs)
            us_ours, us_bnb = median_pair_us(t_ours, t_bnb, repeats)
            print(f"{f'{rows}x{cols}':<13}{op:<11}{us_ours:>11.1f}{us_bnb:>11.1f}{nbytes / us_ours / scale:>12.3f}"
                  f"{nbytes / us_bnb / scale:>10.3f}{us_bnb / us_ours:>16.2f}x{t_ours.mode + '/' + t_bnb.mode:>14}")
        del weights, ours_q, bnb_q


def bench_gemv(shapes: tuple[tuple[int, int], ...], repeats: int, calls: int, graphs: bool) -> None:
    """Batch-1 GEMV: qlora fused 4-bit vs bitsandbytes 4-bit vs torch bf16."""
    from qlora.quant.kernels.triton_gemv import gemv_4bit

    print(f"\nGEMV, one bf16 row; {calls} back-to-back calls a measurement, median of {repeats}")
    print(f"{'shape':<13}{'qlora µs':>10}{'bnb µs':>10}{'bf16 µs':>10}{'qlora TB/s':>12}{'bf16 TB/s':>11}"
          f"{'vs bnb':>9}{'vs bf16':>9}{'timing':>20}")
    cache = l2_bytes()
    for rows, cols in shapes:
        four_bit_bytes = rows * cols // 2 + rows * cols // 64
        n4 = copies_needed(four_bit_bytes, cache)  # rotated by the bytes the 4-bit GEMVs read
        n16 = copies_needed(2 * rows * cols, cache)
        x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
        ours, theirs, dense = [], [], []
        for i in range(max(n4, n16)):
            w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02
            if i < n4:
                packed, state = quantize_4bit(w, "nf4", 64, True)
                bnb_packed, bnb_state = bnb_F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                ours.append(lambda p=packed, s=state: gemv_4bit(x, p, s))
                theirs.append(lambda p=bnb_packed, s=bnb_state: bitsandbytes.matmul_4bit(x, p.t(), quant_state=s))
            if i < n16:
                dense.append(lambda w=w: F.linear(x, w))
            del w
        ref = x.float() @ dequantize_4bit(packed, state, torch.float32).T
        err = ((ours[-1]().float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"fused GEMV off by {err:.2e} on {rows}x{cols}"
        t_ours, t_bnb = Timer(Rotation(ours), "cuda", calls, graphs), Timer(Rotation(theirs), "cuda", calls, graphs)
        t_dense = Timer(Rotation(dense), "cuda", calls, graphs)
        us_ours, us_bnb = median_pair_us(t_ours, t_bnb, repeats)
        us_dense, _ = median_pair_us(t_dense, t_ours, repeats)
        print(f"{f'{rows}x{cols}':<13}{us_ours:>10.1f}{us_bnb:>10.1f}{us_dense:>10.1f}"
              f"{four_bit_bytes / us_ours / 1e6:>12.3f}{2 * rows * cols / us_dense / 1e6:>11.3f}"
              f"{us_bnb / us_ours:>8.2f}x{us_dense / us_ours:>8.2f}x"
              f"{'/'.join(t.mode for t in (t_ours, t_bnb, t_dense)):>20}")
        del ours, theirs, dense, t_ours, t_bnb, t_dense
        torch.cuda.empty_cache()


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape takes ROWSxCOLS (e.g. 4096x4096), got {text!r}") from None
    if rows <= 0 or cols <= 0 or (rows * cols) % 128:
        raise argparse.ArgumentTypeError(f"--shape {text}: a positive size, a multiple of 128 elements")
    return rows, cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shape", type=_shape, action="append", help="ROWSxCOLS, repeatable (default: the table's)")
    parser.add_argument("--repeats", type=int, default=None, help="measurements (default 20 on GPU, 5 on CPU)")
    parser.add_argument("--calls", type=int, default=None, help="back-to-back calls a measurement "
                        "(default 20 on GPU, 3 on CPU)")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="time eagerly between events")
    parser.add_argument("--no-gemv", dest="gemv", action="store_false", help="skip the GEMV table")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    gpu = args.device == "cuda"
    shapes = tuple(args.shape) if args.shape else (GPU_SHAPES if gpu else CPU_SHAPES)
    repeats, calls = args.repeats or (20 if gpu else 5), args.calls or (20 if gpu else 3)
    bench(args.device, shapes, repeats, calls, args.graphs)
    if gpu and args.gemv:
        bench_gemv(shapes, repeats, calls, args.graphs)


if __name__ == "__main__":
    main()
