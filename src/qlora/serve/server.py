"""Run the application under uvicorn, in the foreground (the CLI) or a background thread.

The listening socket is bound before uvicorn starts, so ``port=0`` gives an
ephemeral port whose number is known at once (tests, benchmarks, notebooks).

Shutting down (Ctrl-C, SIGTERM) stops accepting connections and lets running requests finish for
``grace_s`` seconds; then ``on_shutdown`` (the batcher's ``close``) ends the rest, so each client is
answered (a 503 ``server_shutdown``, or that error as a stream's last event) before uvicorn drops the
connections still open ``FLUSH_S`` seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Callable

import uvicorn

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


GRACE_S = 5.0  # running requests may finish on their own for this long after a shutdown begins
FLUSH_S = 2.0  # then the ended ones have this long to send their error before their connection is dropped


class _Server(uvicorn.Server):
    """uvicorn's server, whose shutdown ends the requests still running after the grace period.

    A second Ctrl-C (uvicorn's force exit) skips the rest of the grace period, not the answers nor the app's
    shutdown: the requests end at once and have ``FLUSH_S`` to send them, where uvicorn would drop their
    connections (each task's cancellation, and the lifespan's, logged with its traceback).
    """

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None, grace_s: float) -> None:
        super().__init__(config)
        self.on_shutdown, self.grace_s = on_shutdown, grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is None:
            await super().shutdown(sockets)
            return
        ending = asyncio.create_task(self._end_running(self.grace_s))
        try:
            await super().shutdown(sockets)
            if self.force_exit:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._end_running(0), FLUSH_S)
                await self.lifespan.shutdown()  # skipped by uvicorn: its task would be cancelled, with a traceback
        finally:
            ending.cancel()

    async def _end_running(self, after_s: float) -> None:
        """End the requests still running ``after_s`` seconds from now, then wait for their handlers to finish."""
        await asyncio.sleep(after_s)
        await asyncio.to_thread(self.on_shutdown)  # off the loop: it waits for the decode step under way
        while self.server_state.tasks:
            await asyncio.sleep(0.05)


def make_server(app, log_level: str = "info", access_log: bool = True,
                on_shutdown: Callable[[], None] | None = None, grace_s: float = GRACE_S) -> uvicorn.Server:
    """uvicorn serving ``app``; ``on_shutdown`` ends the requests still running ``grace_s`` seconds into a shutdown."""
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=grace_s + FLUSH_S)
    return _Server(config, on_shutdown, grace_s)


class BackgroundServer:
    """A real uvicorn server for ``app`` on ``host`` (any free port), running in a thread.

    Use as a context manager; ``url`` is its base address, e.g. ``http://127.0.0.1:41234``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 on_shutdown: Callable[[], None] | None = None, grace_s: float = GRACE_S) -> None:
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = make_server(app, log_level=log_level, access_log=False, on_shutdown=on_shutdown,
                                  grace_s=grace_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="qlora-serve", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
