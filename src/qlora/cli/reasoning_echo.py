"""A chat reply's reasoning, shown on standard error as the model writes it.

``qlora generate`` and ``qlora chat`` print a reply's answer on standard output (what a script or a pipe reads) and
its reasoning (:mod:`qlora.infer.reasoning_reply`, gpt-oss's analysis channel) on standard error, so a terminal
shows the model thinking instead of sitting silent for a long reasoning, and the answer stays clean to capture.
"""

from __future__ import annotations

import sys
from typing import Iterable


class ReasoningEcho:
    """Write reasoning pieces to stderr as they come; :meth:`end` separates them from the answer that follows."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.shown = False

    def __call__(self, piece: str) -> None:
        if not piece:
            return
        sys.stderr.write(("" if self.shown else f"{self.prefix}(reasoning) ") + piece)
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        """Close the reasoning shown (if any) with a blank line, before the answer."""
        if self.shown:
            sys.stderr.write("\n\n")
            sys.stderr.flush()
            self.shown = False


def show_answer(pieces: Iterable[str], echo: ReasoningEcho | None = None) -> None:
    """Print a reply's answer on stdout as it comes, then a newline; ``echo`` (the reply's ``on_reasoning``) has put
    its reasoning on stderr first."""
    echo = echo if isinstance(echo, ReasoningEcho) else ReasoningEcho()
    for piece in pieces:
        echo.end()
        sys.stdout.write(piece)
        sys.stdout.flush()
    echo.end()
    sys.stdout.write("\n")
