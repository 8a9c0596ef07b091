"""When a fused module takes its Triton path instead of the PyTorch reference.

On CUDA tensors the Triton kernels run. On the CPU the reference runs, so CPU
training is unchanged, except under Triton's CPU interpreter
(``TRITON_INTERPRET=1``), which is how the kernels are tested without a GPU.
Triton reads that variable when a kernel is decorated, so it is read at import
here too.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # Triton is optional: every fused module keeps its reference path.
    triton = None

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``'s device."""
    if triton is None:
        return False
    return x.is_cuda or (_INTERPRETED and x.device.type == "cpu")


def program_count(device: torch.device) -> int:
    """Programs of a persistent grid: a few per multiprocessor (a handful in the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
