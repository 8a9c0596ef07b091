"""Pager policy on CPU tensors with a tiny simulated budget: values survive
every eviction and restore, and the transfer counts are exactly the policy's."""

from __future__ import annotations

import pytest
import torch

from qlora.optim import PagedAdamW, Pager

PAGE = 64


def _fill(pager: Pager, pid: int, value: int) -> None:
    with pager.use(pid) as buf:
        buf.fill_(value)


def test_new_pages_beyond_budget_start_on_host_without_transfers():
    pager = Pager("cpu", budget_bytes=3 * PAGE, page_bytes=PAGE)
    pids = [pager.new_page() for _ in range(5)]
    assert pager.resident == pids[:3]
    assert (pager.stats.to_host, pager.stats.to_device) == (0, 0)
    assert all(torch.equal(pager.read(p), torch.zeros(PAGE, dtype=torch.uint8)) for p in pids)


def test_sweeps_move_n_minus_k_pages_each_way_and_preserve_values():
    n, k, sweeps = 7, 3, 4
    pager = Pager("cpu", budget_bytes=k * PAGE, page_bytes=PAGE)
    pids = [pager.new_page() for _ in range(n)]
    for sweep in range(sweeps):
        order = pager.sweep_order(pids)
        assert sorted(order) == pids and set(order[:k]) == set(pager.resident)
        for i, pid in enumerate(order):
            with pager.use(pid) as buf:
                if i + 1 < n:
                    pager.prefetch(order[i + 1])
                assert torch.all(buf == sweep * 10 + pid) or sweep == 0
                buf.fill_((sweep + 1) * 10 + pid)
        assert len(pager.resident) == k
    assert pager.stats.to_device == sweeps * (n - k)
    assert pager.stats.to_host == sweeps * (n - k)
    for pid in pids:
        assert torch.all(pager.read(pid) == sweeps * 10 + pid)


def test_clean_pages_are_not_written_back():
    pager = Pager("cpu", budget_bytes=2 * PAGE, page_bytes=PAGE)
    a, b, c = (pager.new_page() for _ in range(3))  # c starts on the host
    _fill(pager, a, 1)
    with pager.use(c, write=False):  # evicts b (never written: dirty as new)
        pass
    assert (pager.stats.to_host, pager.stats.to_device) == (1, 1)
    with pager.use(b, write=False):  # evicts a (dirty), restores b
        pass
    with pager.use(a, write=False):  # evicts c (clean: no copy), restores a
        pass
    assert (pager.stats.to_host, pager.stats.to_device) == (2, 3)
    assert torch.all(pager.read(a) == 1)


def test_lru_victim_skips_the_page_in_use():
    pager = Pager("cpu", budget_bytes=2 * PAGE, page_bytes=PAGE)
    a, b, c = (pager.new_page() for _ in range(3))
    with pager.use(b):
        with pager.use(a):
            pass
        pager.prefetch(c)  # LRU is b, but b is in use: a goes
        assert pager.resident == [b, c]


def test_lowering_the_budget_evicts_least_recently_used_pages():
    pager = Pager("cpu", budget_bytes=4 * PAGE, page_bytes=PAGE)
    pids = [pager.new_page() for _ in range(4)]
    for pid in reversed(pids):
        _fill(pager, pid, pid + 1)
    pager.budget_bytes = 2 * PAGE
    assert pager.resident == [pids[1], pids[0]]
    assert pager.stats.to_host == 2
    assert all(torch.all(pager.read(p) == p + 1) for p in pids)


def test_read_and_write_move_nothing():
    pager = Pager("cpu", budget_bytes=2 * PAGE, page_bytes=PAGE)
    pids = [pager.new_page() for _ in range(3)]
    data = torch.arange(PAGE, dtype=torch.uint8)
    for pid in pids:
        pager.write(pid, data)
    assert all(torch.equal(pager.read(p), data) for p in pids)
    assert (pager.stats.to_host, pager.stats.to_device) == (0, 0)


def test_cpu_without_budget_never_pages():
    pager = Pager("cpu", page_bytes=PAGE)
    pids = [pager.new_page() for _ in range(50)]
    assert pager.resident == pids and pager.budget_bytes is None


@pytest.mark.parametrize("budget", [PAGE, 0])
def test_budget_below_two_pages_is_refused(budget):
    with pytest.raises(ValueError, match="at least 2"):
        Pager("cpu", budget_bytes=budget, page_bytes=PAGE)


def test_optimizer_step_transfers_follow_the_policy():
    """Three 32-bit parameters of 512 elements fill one 4 KiB page each; with
    two slots every step restores and evicts exactly one page."""
    params = [torch.nn.Parameter(torch.randn(512)) for _ in range(3)]
    opt = PagedAdamW(params, page_budget_bytes=2 * 4096, page_bytes=4096)
    for step in range(1, 6):
        for p in params:
            p.grad = torch.randn(512)
        opt.step()
        stats = opt.pager("cpu").stats
        assert (stats.to_host, stats.to_device) == (step, step)
    assert len(opt.pager("cpu")) == 3
