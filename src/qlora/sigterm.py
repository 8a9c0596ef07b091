"""SIGTERM as Ctrl-C, for a command run as a service (``qlora serve`` under systemd or ``docker stop``) or as a job
(``qlora train`` under SLURM or Kubernetes, whose stop is a SIGTERM): it stops cleanly, with its clean-up, at any
point, the model's load included; a training loop's own handler turns either into a checkpoint first.

An interrupt that lands in a finalizer is raised again outside it (:func:`interrupts_kept`), for every command.

Imports nothing heavy: ``qlora.cli.main`` sets it up before a command's first import of torch.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
import time
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


@contextlib.contextmanager
def interrupts_kept() -> Iterator[None]:
    """A KeyboardInterrupt raised in a finalizer is raised again in the main thread, outside it.

    The garbage collector runs finalizers (an object's ``__del__``, a weakref's callback) wherever the program
    happens to be; an interrupt landing in one cannot propagate: Python prints "Exception ignored in" with a
    traceback and drops it, and the command runs on as if never stopped (seen: a rank its launcher stopped printed
    regex's ``Group.__del__`` traceback, then went on). The hook hands it back to the signal's handler instead.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        interrupt = isinstance(unraisable.exc_value, KeyboardInterrupt)
        handled = [s for s in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(s))] if interrupt else []
        if handled:
            # from another thread, once this hook has returned: its handler runs at the main thread's next
            # instruction, which here would still be in this hook (and the interrupt be dropped again)
            _thread.start_new_thread(_interrupt_main_soon, (handled[0],))
        else:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


def _interrupt_main_soon(signum: int) -> None:
    time.sleep(0.002)  # the GIL goes back to the main thread, which leaves the hook
    _thread.interrupt_main(signum)
