"""GPU proof of paging: under a per-process memory cap at which a resident
AdamW step runs out of memory, the paged one completes with the parameters of
an uncapped run."""

from __future__ import annotations

import pytest
import torch

from qlora.optim import AdamW, PagedAdamW

MIB = 2**20


def _run(cls, steps: int = 3, **kw) -> list[torch.Tensor]:
    dev = torch.device("cuda")
    g = torch.Generator(dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16 * MIB, device=dev, generator=g)) for _ in range(4)]  # 256 MiB
    opt = cls(params, lr=1e-3, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=dev, generator=g)
        opt.step()
    torch.cuda.synchronize()
    out = [p.detach().cpu() for p in params]
    del opt, params
    torch.cuda.empty_cache()
    return out


@pytest.mark.cuda
def test_paged_completes_under_cap_where_resident_runs_out():
    reference = _run(AdamW)
    total = torch.cuda.get_device_properties(0).total_memory
    # Params 256 MiB + grads 256 MiB fit; 512 MiB of resident moments do not.
    torch.cuda.set_per_process_memory_fraction((512 + 320) * MIB / total)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            _run(AdamW)
        torch.cuda.empty_cache()
        paged = _run(PagedAdamW, safety_margin_bytes=128 * MIB)  # room for the next grads
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    for a, b in zip(paged, reference):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_paged_gpu_matches_resident_with_half_evicted():
    a = _run(AdamW)
    b = _run(PagedAdamW, page_budget_bytes=256 * MIB)  # half of the 512 MiB of moments
    for x, y in zip(a, b):
        assert torch.equal(x, y)
