"""Replies that match a regular expression as a whole, or are one of given strings.

vLLM's ``guided_regex`` / ``guided_choice`` (``structured_outputs`` ``regex`` / ``choice``)
are served with the automata of :mod:`qlora.infer.regex` and the candidate scan of
:func:`qlora.infer.constrained.choose_token`: only tokens keeping the reply a prefix of
some full match may be chosen, an end-of-turn token only once the reply is a full match,
and once nothing may follow, the best-scored end-of-turn token ends it. Tokens are read as
bytes (:meth:`~qlora.infer.constrained.TokenTexts.advance`): a character the vocabulary
spells only in byte tokens, or that a token splits, is written in pieces. The pattern
dialect is the one JSON Schema ``pattern`` s are enforced in (Python's ``re`` and
ECMA-262 agree on it); anything outside it raises :class:`~qlora.infer.regex.PatternError`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .constrained import TokenTexts, choose_token, masked_partial
from .generate import SamplingOptions
from .regex import Regex

_TOP = 0x10FFFF


def choice_pattern(choices: Sequence[str]) -> str:
    """A pattern matching exactly the strings of ``choices`` (each character literal)."""
    return "|".join("".join(c if c.isascii() and c.isalnum() else "\\" + c for c in choice) for choice in choices)


class RegexReply:
    """The per-request constraint of a reply matching ``regex`` whole (see the module docstring).

    Args:
        tokenizer: the served tokenizer.
        regex: the compiled pattern, anchored (``Regex(source, anchored=True)``).
        stop_ids: end-of-turn tokens; one ends the reply once it is a full match.
    """

    prefix_ids: list[int] = []

    def __init__(self, tokenizer, regex: Regex, stop_ids: frozenset[int]) -> None:
        self.texts = TokenTexts.of(tokenizer)
        self.regex = regex
        self.stop_ids = frozenset(stop_ids)
        self.states = regex.start
        self.pending = b""  # a partial character's bytes

    @property
    def complete(self) -> bool:
        """Whether the reply so far is a full match (it may end here)."""
        return not self.pending and self.regex.accepts(self.states)

    def choose(self, logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
               allows: Callable[[int], bool] | None = None) -> int | None:
        """The next token of the reply among those ``allows`` allows (None: no token of the vocabulary continues it)."""
        if not self.pending and not self.regex.any_in(self.states, 0, _TOP):  # a full match nothing may extend
            stops = [t for t in self.stop_ids if t < logits.numel() and (allows is None or allows(t))]
            return max(stops, key=lambda t: float(logits[t])) if stops else None
        token = choose_token(masked_partial(logits, self.texts, self.pending), options, generator,
                             self.accepts if allows is None else lambda t: allows(t) and self.accepts(t))
        if token is not None and token not in self.stop_ids:
            self.states, self.pending = self._advance(token)  # type: ignore[misc]
        return token

    def _feed(self, text: str) -> frozenset[int] | None:
        states = self.states
        for ch in text:
            states = self.regex.step(states, ord(ch))
            if not states:
                return None
        return states

    def _advance(self, token: int) -> tuple[frozenset[int], bytes] | None:
        return self.texts.advance(token, self.pending, self._feed, self.regex.any_in)

    def accepts(self, token: int) -> bool:
        """Whether ``token`` may come next."""
        if token in self.stop_ids:
            return self.complete
        text = None if self.pending else self.texts.text(token)
        if text:  # the common case first, without byte arithmetic: a token of whole characters
            return self._feed(text) is not None
        return self._advance(token) is not None
