"""SIGTERM as Ctrl-C, for a command run as a service (``qlora serve`` under systemd or ``docker stop``) or as a job
(``qlora train`` under SLURM or Kubernetes, whose stop is a SIGTERM): it stops cleanly, with its clean-up, at any
point, the model's load included; a training loop's own handler turns either into a checkpoint first.

Imports nothing heavy: ``qlora.cli.main`` sets it up before a command's first import of torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does (in the main thread: no other may set a handler).

    uvicorn shuts down gracefully on both, then re-raises the signal to the handler it found: SIGTERM's default
    would kill the process (status 143) before the caller's clean-up (the batcher's close) ran; before that, while
    the model loads, it would end the command without the short message and status 130 Ctrl-C gives.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
