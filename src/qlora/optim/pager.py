"""Page pool: fixed-size optimizer-state pages that move between a device and
pinned host memory under a byte budget.

Why fixed-size pages: every device buffer is the same size, so an evicted
page's buffer is handed straight to the page coming in. The pool never
fragments the allocator and never asks for more than ``budget`` bytes; it uses
ordinary device allocations, never CUDA managed memory.

Policy (what the transfer counts in the tests hold):

- A new page is zero-filled on the device if a slot is free, otherwise on the
  host (no transfer).
- Using a page that lives on the host restores it (one host-to-device copy),
  evicting the least recently used unpinned resident page first when all slots
  are taken; an eviction copies to the host only if the page changed since its
  host copy was made (it is *dirty*).
- :meth:`Pager.sweep_order` visits resident pages first, so one optimizer step
  over ``n`` pages with ``k`` slots moves ``n - k`` pages each way.

On CUDA, copies run on a side stream so that the next page streams in while
the current one updates. Stream discipline (held by a test with a recording
fake of :class:`CudaStreams`):

- before any side-stream copy, the side stream waits for the work already
  queued on the compute stream (that work may still read or write the buffer
  the copy touches, or the memory the allocator just handed out);
- the compute stream waits for a restore's event before it uses the page;
- every device buffer a side-stream copy touches is recorded on the side
  stream (``record_stream``), so dropping it never frees memory a pending
  copy still uses.

On a CPU device with no budget, nothing is ever evicted: paging is a no-op. A
CPU device with a budget simulates the policy (host buffers are then plain CPU
tensors), which is how the tests drive it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError

DEFAULT_PAGE_BYTES = 1 << 21
DEFAULT_SAFETY_MARGIN_BYTES = 1 << 30


@dataclass
class _Page:
    device_buf: torch.Tensor | None = None
    host_buf: torch.Tensor | None = None
    dirty: bool = True
    ready: torch.cuda.Event | None = None


class CudaStreams:
    """The CUDA stream operations the pager needs: a side stream for copies,
    the compute (current) stream, and asynchronous copies on the side stream."""

    pin_memory = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def on_side(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.side)

    def keep_alive(self, tensor: torch.Tensor) -> None:
        """Tell the allocator that the side stream uses ``tensor`` (device memory only)."""
        if tensor.is_cuda:
            tensor.record_stream(self.side)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)`` queued on the side stream after the work already on the compute stream."""
        self.side.wait_stream(self.current())
        with self.on_side():
            dst.copy_(src, non_blocking=True)
        self.keep_alive(dst)
        self.keep_alive(src)

    def record_event(self) -> torch.cuda.Event:
        return self.side.record_event()

    def synchronize(self) -> None:
        self.side.synchronize()
        self.current().synchronize()


@dataclass
class PagerStats:
    """Counts of page copies, by direction."""

    to_host: int = 0
    to_device: int = 0


def device_headroom_bytes(device: torch.device, safety_margin_bytes: int = DEFAULT_SAFETY_MARGIN_BYTES) -> int:
    """Bytes a pager may take on ``device`` now: free memory (including blocks
    the caching allocator holds but does not use, and within any
    ``set_per_process_memory_fraction`` cap) minus a margin left for
    activations and library workspaces."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    cached = reserved - torch.cuda.memory_allocated(device)
    # torch < 2.6 cannot report a set_per_process_memory_fraction cap: count the whole card then.
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    cap = int(total * fraction) - reserved
    return max(0, min(free, cap) + cached - safety_margin_bytes)


def page_slots(page_bytes: int, budget_bytes: int | None) -> int | None:
    """The pages of ``page_bytes`` a budget holds (``None``: no budget, unlimited); checked when a paged optimizer is
    built, not at its first step, where the pager is made.

    Raises:
        UsageError (a ValueError): ``page_bytes`` not positive, or a budget that holds fewer than 2 pages.
    """
    if page_bytes <= 0:
        raise UsageError(f"page_bytes must be positive, got {page_bytes}")
    if budget_bytes is None:
        return None
    slots = budget_bytes // page_bytes
    if slots < 2:
        raise UsageError(f"a paging budget of {budget_bytes} bytes holds {slots} page(s) of {page_bytes} bytes; it "
                         "must hold at least 2 (raise the budget or lower page_bytes)")
    return slots


class Pager:
    """Owns a set of pages of ``page_bytes`` each and decides where they live.

    Args:
        device: where pages are used.
        budget_bytes: device bytes the pages may occupy; ``None`` means
            unlimited on CPU and :func:`device_headroom_bytes` on CUDA.
        page_bytes: size of every page.
        safety_margin_bytes: left free when the budget is derived on CUDA.
        streams: the stream operations (default: :class:`CudaStreams` on
            CUDA, none on the CPU); tests pass a recording fake.

    Raises:
        ValueError: if the budget holds fewer than two pages (one being
            updated, one streaming in) or the page size is not positive.
    """

    def __init__(
        self,
        device: torch.device | str,
        budget_bytes: int | None = None,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        safety_margin_bytes: int = DEFAULT_SAFETY_MARGIN_BYTES,
        streams: CudaStreams | None = None,
    ) -> None:
        page_slots(page_bytes, None)
        self.device = torch.device(device)
        self.page_bytes = page_bytes
        if budget_bytes is None and self.device.type == "cuda":
            budget_bytes = device_headroom_bytes(self.device, safety_margin_bytes)
        self._slots = page_slots(page_bytes, budget_bytes)
        self._pages: list[_Page] = []
        self._resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._pinned: set[int] = set()
        if streams is None and self.device.type == "cuda":
            streams = CudaStreams(self.device)
        self._streams = streams
        self.stats = PagerStats()

    @property
    def budget_bytes(self) -> int | None:
        """Device bytes the pages may occupy (``None``: unlimited)."""
        return None if self._slots is None else self._slots * self.page_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int | None) -> None:
        self._slots = page_slots(self.page_bytes, value)
        while self._slots is not None and len(self._resident) > self._slots:
            self._evict(self._victim())

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def resident(self) -> list[int]:
        """Ids of the pages on the device, least recently used first."""
        return list(self._resident)

    def new_page(self) -> int:
        """Add a zero-filled page and return its id."""
        page = _Page()
        self._pages.append(page)
        pid = len(self._pages) - 1
        if self._has_free_slot():
            page.device_buf = torch.zeros(self.page_bytes, dtype=torch.uint8, device=self.device)
            self._resident[pid] = None
        else:
            page.host_buf = self._host_zeros()
            page.dirty = False
        return pid

    def sweep_order(self, pids: Sequence[int]) -> list[int]:
        """``pids`` with resident pages first, so a sweep evicts only pages it has already used."""
        return [p for p in pids if p in self._resident] + [p for p in pids if p not in self._resident]

    def prefetch(self, pid: int) -> None:
        """Start bringing page ``pid`` to the device (asynchronously on CUDA)."""
        if pid in self._resident:
            self._resident.move_to_end(pid)
            return
        page = self._pages[pid]
        if not self._has_free_slot():
            victim = self._victim()
            page.device_buf = self._evict(victim)
        else:
            page.device_buf = torch.empty(self.page_bytes, dtype=torch.uint8, device=self.device)
        self._copy(page.device_buf, page.host_buf)
        page.ready = self._record()
        page.dirty = False
        self.stats.to_device += 1
        self._resident[pid] = None

    @contextlib.contextmanager
    def use(self, pid: int, write: bool = True) -> Iterator[torch.Tensor]:
        """Yield page ``pid``'s device buffer (uint8, ``page_bytes`` long),
        pinned against eviction for the duration; ``write`` marks it dirty."""
        self.prefetch(pid)
        page = self._pages[pid]
        if page.ready is not None:
            self._streams.current().wait_event(page.ready)
            page.ready = None
        self._pinned.add(pid)
        try:
            yield page.device_buf
        finally:
            self._pinned.discard(pid)
            page.dirty = page.dirty or write

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of page ``pid``'s bytes, wherever it lives; moves nothing."""
        page = self._pages[pid]
        self._sync()
        src = page.device_buf if page.device_buf is not None else page.host_buf
        return src.to("cpu", copy=True)

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Overwrite page ``pid``'s bytes in place, wherever it lives; moves nothing."""
        page = self._pages[pid]
        self._sync()
        if page.device_buf is not None:
            page.device_buf.copy_(data)
            page.dirty = True
        else:
            page.host_buf.copy_(data)

    def _sync(self) -> None:
        if self._streams is not None:
            self._streams.synchronize()

    def _has_free_slot(self) -> bool:
        return self._slots is None or len(self._resident) < self._slots

    def _victim(self) -> int:
        for pid in self._resident:
            if pid not in self._pinned:
                return pid
        raise RuntimeError("every resident page is in use; the pager needs a free slot")

    def _evict(self, pid: int) -> torch.Tensor:
        """Move page ``pid`` to the host and return its freed device buffer."""
        page = self._pages[pid]
        if page.dirty:
            if page.host_buf is None:
                page.host_buf = self._host_empty()
            self._copy(page.host_buf, page.device_buf)
            page.dirty = False
            self.stats.to_host += 1
        buf, page.device_buf = page.device_buf, None
        del self._resident[pid]
        return buf

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._streams is None:
            dst.copy_(src)
        else:
            self._streams.copy(dst, src)

    def _record(self) -> torch.cuda.Event | None:
        return None if self._streams is None else self._streams.record_event()

    def _host_empty(self) -> torch.Tensor:
        pin = self._streams is not None and self._streams.pin_memory
        return torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=pin)

    def _host_zeros(self) -> torch.Tensor:
        return self._host_empty().zero_()
