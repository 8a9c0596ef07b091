"""A Responses API request run in the background (``background: true``).

The request's stream of events (:func:`qlora.serve.app._response_events`, the one a streaming
request reads) is drained by a task of the server's event loop, so the generation goes on when
the client that created it hangs up; every event updates the kept response (through the writer's
``keep``; while it is ``in_progress``, its message item is :attr:`BackgroundRun.streaming`, appended to at
each text delta, so ``GET /v1/responses/{id}`` shows the text streamed so far). When the request also asked for ``stream``, the
events are kept in order too: event ``k`` has ``sequence_number`` ``k``, so a client that lost its
stream resumes it with ``GET /v1/responses/{id}?stream=true&starting_after=k``.

:meth:`BackgroundRun.cancel` stops the task; the stream's own cleanup frees the batch row at the
batcher's next step, and the run ends with the event ``cancelled`` writes (``response.failed`` carrying
the response in status ``cancelled``, its output what was generated before the cancel). A run that fails
ends its own stream (``error``, then ``response.failed``), so every run ends on a final state.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable


class BackgroundRun:
    """The task decoding one background response, and its stream events when they are kept.

    Args:
        cancelled: writes the last event of a cancelled run and records that state.
        keep_events: keep every event for replay (the request asked for ``stream``).
    """

    def __init__(self, cancelled: Callable[[], str], keep_events: bool) -> None:
        self.cancelled, self.keep_events = cancelled, keep_events
        self.events: list[str] = []
        self.finished = False
        self.streaming: Any = None  # the message item being streamed (a responses.StreamedMessage), until the end
        self.task: asyncio.Task | None = None
        self._changed, self._done, self._stopping = asyncio.Event(), asyncio.Event(), False

    def start(self, events: AsyncIterator[str]) -> None:
        self.task = asyncio.get_running_loop().create_task(self._drain(events))

    async def _drain(self, events: AsyncIterator[str]) -> None:
        async for event in events:  # cancelled: cancel() writes the last event
            self._add(event)
        self._finish()

    async def cancel(self) -> None:
        """Stop the run (its batch row is freed at the batcher's next step); returns once it has ended."""
        if self.finished or self._stopping:
            await self._done.wait()
            return
        self._stopping = True
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if not self.finished:  # it may have ended on its own meanwhile
            self._add(self.cancelled())
            self._finish()

    async def replay(self, after: int = -1) -> AsyncIterator[str]:
        """The kept events with a sequence number above ``after``, then each new one until the run ends."""
        k = max(after + 1, 0)
        while True:
            changed = self._changed
            while k < len(self.events):
                yield self.events[k]
                k += 1
            if self.finished:
                return
            await changed.wait()

    def _add(self, event: str) -> None:
        if self.keep_events:
            self.events.append(event)
        self._notify()

    def _finish(self) -> None:
        self.finished, self.streaming = True, None  # the kept response holds the whole message now
        self._done.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
