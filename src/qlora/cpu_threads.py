"""How many threads a model computes with on the CPU.

PyTorch starts one OpenMP thread per core. Each matmul then ends at a barrier
where the threads wait for each other: when a thread's core is busy with
another process, or when a matmul is only microseconds of work (small models),
the waiting costs more than the parallel work saves. Measured on 2 busy cores
(`bench/cpu_threads.py`, BENCHMARKS.md): a [512 x h] @ [h x h] forward+backward took
3.5 ms with one thread and 294 ms with two at h = 128, 45 vs 381 ms at h = 512,
and 763 vs 1174 ms at h = 2048; ``qlora demo`` (h = 128) ran 60 steps in 7 s
with one thread and had not finished in 10 minutes with two.

So small models (hidden size below :data:`SMALL_HIDDEN`) use one thread, and
larger ones one thread per core that other processes leave idle (the 1-minute
load average, ours excluded). ``OMP_NUM_THREADS`` overrides the choice.
"""

from __future__ import annotations

import math
import os

import torch

SMALL_HIDDEN = 1024


def choose_cpu_threads(hidden_size: int, cores: int | None = None, load: float | None = None) -> int:
    """Threads for a model of ``hidden_size`` on ``cores`` cores with a 1-minute ``load`` average.

    Args:
        hidden_size: the model's hidden size (the width of most of its matmuls).
        cores: cores this process may run on (default: its CPU affinity).
        load: the system's 1-minute load average (default: ``os.getloadavg``),
            which counts this process as about one.
    """
    if hidden_size < SMALL_HIDDEN:
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy_elsewhere = max(0.0, load - 1.0)
    return max(1, min(cores, math.floor(cores - busy_elsewhere + 0.5)))


def apply_cpu_threads(model, device: torch.device | str) -> int | None:
    """Set PyTorch's thread count for ``model`` on the CPU; None (nothing changed) on a GPU or
    when ``OMP_NUM_THREADS`` is set. Returns the count chosen."""
    if torch.device(device).type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or SMALL_HIDDEN
    threads = choose_cpu_threads(int(hidden))
    torch.set_num_threads(threads)
    return threads
