"""Optimizer memory and paging cost for the LoRA parameters of a Llama-3-8B
shape (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV heads,
r=16 on q, k, v, o, gate, up, down).

On CPU prints the state byte counts; on a GPU also measures the optimizer's
device memory (32-bit, 8-bit, paged) and the step time with all pages
resident vs half evicted.

    python bench/optim.py            # byte counts (+ GPU numbers if CUDA)
"""

from __future__ import annotations

import time

import torch

from qlora.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from qlora.optim import moments

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, RANK = 4096, 14336, 32, 32, 8, 16
KV = HIDDEN // HEADS * KV_HEADS
GIB = 2**30


def lora_shapes() -> list[tuple[int, int]]:
    """(out, in) of every LoRA matrix: A is (r, in), B is (out, r)."""
    linears = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
               "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}
    shapes = []
    for _ in range(LAYERS):
        for out_f, in_f in linears.values():
            shapes += [(RANK, in_f), (out_f, RANK)]
    return shapes


def state_bytes(bits: int) -> int:
    """Bytes of both moments for all LoRA params (8-bit: codes + block absmax)."""
    return sum(moments.nbytes(a * b, 32 if bits == 32 or a * b < 4096 else 8) for a, b in lora_shapes())


def print_byte_counts() -> None:
    n = sum(a * b for a, b in lora_shapes())
    print(f"LoRA params: {len(lora_shapes())} tensors, {n / 1e6:.1f} M elements ({n * 4 / GIB:.3f} GiB fp32)")
    for bits in (32, 8):
        print(f"{bits:>2}-bit state: {state_bytes(bits) / GIB:.3f} GiB")


def _gpu_params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in lora_shapes()]


def _measure(cls, **kw) -> tuple[int, float]:
    params = _gpu_params()
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt = cls(params, lr=1e-4, **kw)
    opt.step()  # allocates the state
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    times = []
    for _ in range(10):
        start = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del opt, params
    torch.cuda.empty_cache()
    return used, sorted(times)[len(times) // 2]


def print_gpu_numbers() -> None:
    print(f"GPU: {torch.cuda.get_device_name()}")
    half32, half8 = state_bytes(32) // 2, state_bytes(8) // 2
    runs = [
        ("adamw (32-bit)", AdamW, {}),
        ("adamw_8bit", AdamW8bit, {}),
        ("paged_adamw_32bit, all resident", PagedAdamW, {}),
        ("paged_adamw_32bit, half evicted", PagedAdamW, {"page_budget_bytes": half32}),
        ("paged_adamw_8bit, all resident", PagedAdamW8bit, {}),
        ("paged_adamw_8bit, half evicted", PagedAdamW8bit, {"page_budget_bytes": half8}),
    ]
    print(f"{'optimizer':<34} {'device state GiB':>16} {'step ms':>8}")
    for label, cls, kw in runs:
        used, t = _measure(cls, **kw)
        print(f"{label:<34} {used / GIB:>16.3f} {t * 1e3:>8.1f}")


if __name__ == "__main__":
    print_byte_counts()
    if torch.cuda.is_available():
        print_gpu_numbers()
