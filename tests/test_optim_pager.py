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


class _FakeStream:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: "_FakeStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def record_event(self) -> tuple:
        event = ("event", len(self.log))
        self.log.append(("record_event", self.name, event))
        return event

    def wait_event(self, event: tuple) -> None:
        self.log.append(("wait_event", self.name, event))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name))


class _RecordingStreams:
    """The pager's CUDA stream operations with fake streams that record every call
    (the copies themselves run synchronously on CPU tensors)."""

    pin_memory = False

    def __init__(self) -> None:
        from qlora.optim.pager import CudaStreams

        self.log: list = []
        self.side, self.compute = _FakeStream("side", self.log), _FakeStream("compute", self.log)
        self._real = CudaStreams.__new__(CudaStreams)  # its copy() protocol, with our primitives
        self._real.side, self._real.current, self._real.on_side, self._real.keep_alive = (
            self.side, self.current, self.on_side, self.keep_alive)

    def current(self) -> _FakeStream:
        return self.compute

    def on_side(self):
        import contextlib

        log = self.log

        @contextlib.contextmanager
        def side():
            log.append(("side_begin",))
            yield
            log.append(("side_end",))

        return side()

    def keep_alive(self, tensor: torch.Tensor) -> None:
        self.log.append(("keep_alive", tensor.data_ptr()))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._real.copy(dst, src)
        self.log.append(("copied", dst.data_ptr(), src.data_ptr()))

    def record_event(self):
        return self.side.record_event()

    def synchronize(self) -> None:
        self.side.synchronize()
        self.compute.synchronize()


def test_stream_discipline_under_a_recording_fake():
    """Every side-stream copy first waits for the compute stream's queued work;
    every device buffer a copy touches is recorded on the side stream; the
    compute stream waits for a restore's event before it uses the page; buffers
    freed by a budget cut are recorded too. Checked over paged sweeps with
    read-only and dirty pages (a clean page evicted and its buffer reused)."""
    streams = _RecordingStreams()
    log = streams.log
    pager = Pager("cpu", budget_bytes=2 * PAGE, page_bytes=PAGE, streams=streams)
    pids = [pager.new_page() for _ in range(5)]
    for sweep in range(3):
        order = pager.sweep_order(pids)
        for i, pid in enumerate(order):
            write = (pid + sweep) % 2 == 0  # some uses leave the page clean
            with pager.use(pid, write=write) as buf:
                if i + 1 < len(order):
                    pager.prefetch(order[i + 1])
                log.append(("compute", buf.data_ptr(), pid))
                if write:
                    buf.fill_(sweep * 10 + pid)
    with pager.use(pids[0]) as buf:
        log.append(("compute", buf.data_ptr(), pids[0]))
    pager.budget_bytes = 2 * PAGE  # no change
    dirty_ptrs = {pager._pages[p].device_buf.data_ptr() for p in pager.resident}
    pager.budget_bytes = None  # no eviction either
    pager.budget_bytes = 2 * PAGE

    copies = [i for i, e in enumerate(log) if e[0] == "side_begin"]
    assert len(copies) >= 10 and pager.stats.to_host > 0 and pager.stats.to_device > 0
    for i in copies:
        last_compute = max((j for j in range(i) if log[j][0] == "compute"), default=-1)
        assert any(log[j] == ("wait_stream", "side", "compute") for j in range(last_compute + 1, i)), (
            f"copy at log[{i}] does not wait for the compute work queued before it: {log[max(0, i - 6):i + 1]}")
        k = next(k for k in range(i, len(log)) if log[k][0] == "copied")
        copied = log[k]
        kept = {e[1] for e in log[i:k] if e[0] == "keep_alive"}
        assert {copied[1], copied[2]} <= kept, f"copy at log[{i}] leaves a buffer unrecorded"
    # Compute after a restore waits for the event recorded after that restore's copy.
    for j, entry in enumerate(log):
        if entry[0] != "compute":
            continue
        restores = [i for i in copies if i < j and next(e for e in log[i:] if e[0] == "copied")[1] == entry[1]]
        if restores:
            event = next(e[2] for e in log[restores[-1]:] if e[0] == "record_event")
            assert ("wait_event", "compute", event) in log[restores[-1]:j], f"compute at log[{j}] does not wait"
    assert dirty_ptrs
    for pid in pids:
        last_write = max(s for s in range(3) if (pid + s) % 2 == 0)
        assert torch.all(pager.read(pid) == last_write * 10 + pid)


def test_budget_cut_records_the_freed_buffers_on_the_side_stream():
    streams = _RecordingStreams()
    pager = Pager("cpu", budget_bytes=3 * PAGE, page_bytes=PAGE, streams=streams)
    pids = [pager.new_page() for _ in range(3)]
    for pid in pids:
        _fill(pager, pid, pid + 1)
    ptrs = [pager._pages[p].device_buf.data_ptr() for p in pids]
    streams.log.clear()
    pager.budget_bytes = 2 * PAGE  # evicts the least recently used page, which is dirty
    log = streams.log
    assert log[0] == ("wait_stream", "side", "compute")
    assert ("keep_alive", ptrs[0]) in log and pager.resident == pids[1:]
    assert torch.all(pager.read(pids[0]) == 1)


def test_device_code_tables_are_made_once_per_device():
    """The 8-bit optimizer fetches its two code books every step: on a device they
    must come from a cache, not from a host-to-device copy each time."""
    from qlora.quant import code_4bit, dynamic_code

    for signed in (True, False):
        assert dynamic_code(signed, "meta") is dynamic_code(signed, torch.device("meta"))
    assert code_4bit("nf4", "meta") is code_4bit("nf4", "meta")
    assert torch.equal(dynamic_code(True, "cpu"), dynamic_code(True))
