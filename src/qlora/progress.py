"""Progress of a long loop: tqdm's live bar on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns; sent to a pipe or a file (``nohup``,
CI logs, ``2>&1 | tee run.log``) every redraw is more noise in the log. So when
the stream is not a terminal, :class:`LineProgress` writes the same figures as
one plain line each tenth of the way, at least every minute meanwhile, and where
the loop stopped.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO


def progress_bar(total: int, *, initial: int = 0, unit: str = "it", unit_scale: bool = False, desc: str = "",
                 enabled: bool = True, file: TextIO | None = None) -> Any:
    """A tqdm bar on ``file`` (stderr) when it is a terminal, in a notebook (tqdm's widget) or when progress is
    off, else a :class:`LineProgress`."""
    from tqdm.auto import tqdm

    file = sys.stderr if file is None else file
    notebook = any(c.__name__ == "tqdm_notebook" for c in tqdm.__mro__)  # tqdm.auto found a Jupyter kernel
    if not enabled or notebook or file.isatty():
        return tqdm(total=total, initial=initial, unit=unit, unit_scale=unit_scale, desc=desc or None,
                    disable=not enabled, dynamic_ncols=True, file=file)
    return LineProgress(total, initial=initial, unit=unit, unit_scale=unit_scale, desc=desc, file=file)


class LineProgress:
    """tqdm's ``update``/``set_postfix``/``write``/``close`` as plain lines:
    ``30/100 steps (30%), 00:12 elapsed, ETA 00:28, 2.50 steps/s, loss=1.2345``.

    Args:
        every: the share of ``total`` between lines.
        interval: seconds after which a line is written even between those shares.
        clock: seconds, monotonic (a test's clock).
    """

    def __init__(self, total: int, *, initial: int = 0, unit: str = "it", unit_scale: bool = False, desc: str = "",
                 file: TextIO | None = None, every: float = 0.1, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.n, self.unit, self.unit_scale, self.desc = max(total, 1), initial, unit, unit_scale, desc
        self.file, self.every, self.interval, self.clock = file, every, interval, clock
        self.postfix = ""
        self._start, self._start_n = clock(), initial
        self._shown_n, self._shown_at = initial, self._start

    def update(self, n: int = 1) -> None:
        self.n += n
        share = self.every * self.total
        if self.n // share > self._shown_n // share or self.n >= self.total or \
                self.clock() - self._shown_at >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def write(self, message: str) -> None:
        print(message)  # to stdout, as tqdm.write

    def close(self) -> None:
        if self._shown_n != self.n:
            self._line()

    def _line(self) -> None:
        from tqdm import tqdm

        now = self.clock()
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        eta = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else ("00:00" if self.n >= self.total
                                                                                  else "?")
        if self.unit_scale:
            count = f"{tqdm.format_sizeof(self.n)}{self.unit}/{tqdm.format_sizeof(self.total)}{self.unit}"
            speed = f"{tqdm.format_sizeof(rate)}{self.unit}/s"
        else:
            units = self.unit + "s" if len(self.unit) > 1 else self.unit
            count, speed = f"{self.n}/{self.total} {units}", f"{rate:.2f} {units}/s"
        parts = [f"{count} ({100 * self.n // self.total}%)", f"{tqdm.format_interval(elapsed)} elapsed", f"ETA {eta}"]
        parts += [speed] if rate > 0 else []
        parts += [self.postfix] if self.postfix else []
        print((f"{self.desc}: " if self.desc else "") + ", ".join(parts), file=self.file or sys.stderr, flush=True)
        self._shown_n, self._shown_at = self.n, now
