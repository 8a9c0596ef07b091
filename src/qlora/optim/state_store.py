"""Optimizer state storage: each parameter's moments as chunks, held either in
their own device tensors (:class:`ResidentStore`) or packed into a
:class:`~qlora.optim.pager.Pager`'s pages (:class:`PagedStore`).

The optimizer asks a store for *batches*: lists of ``(chunk, moments)`` whose
moment tensors are usable on the device right now. A resident store yields one
batch with everything; a paged store yields one batch per page, visiting
resident pages first and prefetching the next page while the caller updates
the current one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import moments
from .pager import Pager

Batch = list[tuple["Chunk", dict[str, torch.Tensor]]]


@dataclass(eq=False)
class Chunk:
    """Elements ``[start, stop)`` of a flattened parameter and where their moments live."""

    param: torch.Tensor
    start: int
    stop: int
    bits: int
    page: int = -1
    offset: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return self.stop - self.start


class ResidentStore:
    """Moments in ordinary tensors on the parameter's device: one chunk a parameter."""

    def allocate(self, param: torch.Tensor, bits: int) -> list[Chunk]:
        """Zero moments for all of ``param``."""
        n = param.numel()
        return [Chunk(param, 0, n, bits, tensors=moments.zeros(n, bits, param.device))]

    def batches(self, chunks: list[Chunk], write: bool = True) -> Iterator[Batch]:
        """All ``chunks`` at once."""
        yield [(c, c.tensors) for c in chunks]

    def read(self, chunks: list[Chunk]) -> list[dict[str, torch.Tensor]]:
        """The chunks' moments (the live tensors)."""
        return [c.tensors for c in chunks]

    def write(self, chunks: list[Chunk], values: list[dict[str, torch.Tensor]]) -> None:
        """Overwrite the chunks' moments."""
        for chunk, vals in zip(chunks, values):
            for key, t in chunk.tensors.items():
                t.copy_(vals[key])


class PagedStore:
    """Moments packed into pages: chunks fill the open page, a parameter larger
    than the space left is split at quantization-block boundaries."""

    def __init__(self, pager: Pager) -> None:
        self.pager = pager
        self._open_page = -1
        self._used = pager.page_bytes

    def allocate(self, param: torch.Tensor, bits: int) -> list[Chunk]:
        """Zero moments for all of ``param``, placed in pages (new ones as needed)."""
        chunks, start, n = [], 0, param.numel()
        while start < n:
            k = moments.elements_fitting(self.pager.page_bytes - self._used, n - start, bits)
            if k == 0:
                if self._used == 0:
                    raise ValueError(
                        f"page_bytes={self.pager.page_bytes} cannot hold one {bits}-bit quantization block; raise it"
                    )
                self._open_page, self._used = self.pager.new_page(), 0
                continue
            chunks.append(Chunk(param, start, start + k, bits, page=self._open_page, offset=self._used))
            self._used += moments.nbytes(k, bits)
            start += k
        return chunks

    def batches(self, chunks: list[Chunk], write: bool = True) -> Iterator[Batch]:
        """One batch per page holding any of ``chunks``, resident pages first."""
        by_page: dict[int, list[Chunk]] = {}
        for c in chunks:
            by_page.setdefault(c.page, []).append(c)
        order = self.pager.sweep_order(list(by_page))
        for i, pid in enumerate(order):
            with self.pager.use(pid, write=write) as buf:
                if i + 1 < len(order):
                    self.pager.prefetch(order[i + 1])
                yield [(c, moments.views(buf, c.offset, c.numel, c.bits)) for c in by_page[pid]]

    def read(self, chunks: list[Chunk]) -> list[dict[str, torch.Tensor]]:
        """CPU copies of the chunks' moments, read where each page lives (nothing moves)."""
        pages = {pid: self.pager.read(pid) for pid in {c.page for c in chunks}}
        return [moments.views(pages[c.page], c.offset, c.numel, c.bits) for c in chunks]

    def write(self, chunks: list[Chunk], values: list[dict[str, torch.Tensor]]) -> None:
        """Overwrite the chunks' moments where each page lives (nothing moves)."""
        pages = {pid: self.pager.read(pid) for pid in {c.page for c in chunks}}
        for chunk, vals in zip(chunks, values):
            for key, t in moments.views(pages[chunk.page], chunk.offset, chunk.numel, chunk.bits).items():
                t.copy_(vals[key])
        for pid, data in pages.items():
            self.pager.write(pid, data)
