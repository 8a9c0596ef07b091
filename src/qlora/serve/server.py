"""Run the application under uvicorn, in the foreground (the CLI) or a background thread.

The listening socket is bound before uvicorn starts, so ``port=0`` gives an
ephemeral port whose number is known at once (tests, benchmarks, notebooks).
"""

from __future__ import annotations

import socket
import threading
import time

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


def make_server(app, log_level: str = "info", access_log: bool = True) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                         timeout_graceful_shutdown=5))


class BackgroundServer:
    """A real uvicorn server for ``app`` on ``host`` (any free port), running in a thread.

    Use as a context manager; ``url`` is its base address, e.g. ``http://127.0.0.1:41234``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = make_server(app, log_level=log_level, access_log=False)
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
