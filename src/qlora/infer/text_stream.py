"""Token ids in, text pieces out: incremental detokenization with stop strings.

A reply is re-decoded as a whole after each token and only the new suffix is
released, so the pieces join to exactly ``tokenizer.decode(tokens,
skip_special_tokens=True)`` even where one character spans several tokens (a
trailing partial UTF-8 character, shown as U+FFFD, is held back). With stop
strings, text that could still grow into one is held back too, and a match ends
the stream with the text before it (the OpenAI ``stop`` semantics).
"""

from __future__ import annotations

from typing import Sequence


class TextStream:
    """Turn one reply's token ids into text pieces, honouring stop strings."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text already released
        self.stopped = False  # a stop string matched; nothing more will be released

    def push(self, token: int) -> str:
        """Add one token; return the text that became safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._text()
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[:len(text) - self._held_back(text)])

    def flush(self) -> str:
        """The rest of the reply, at its end (held-back text included)."""
        return "" if self.stopped else self._release(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _release(self, text: str) -> str:
        piece = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Index of the earliest stop string in the unreleased text, if any."""
        hits = [i for s in self.stop_strings
                if (i := text.find(s, max(0, self.shown - len(s) + 1))) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        longest = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[len(text) - n:]):
                    longest = n
                    break
        return longest
