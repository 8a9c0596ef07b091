"""OpenAI's shapes of token logprobs in a reply: chat's ``logprobs.content`` and completions' ``logprobs``.

The numbers come from the batcher's events (:mod:`qlora.infer.logprobs`); this module only
writes them as OpenAI clients and eval harnesses read them.
"""

from __future__ import annotations

import codecs
from typing import Any

from ..infer.logprobs import TokenLogprob, TokenPieces


def chat_logprobs(pieces: TokenPieces, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content``: token, logprob, bytes and the top alternatives of each token."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": pieces.text(token), "logprob": logprob, "bytes": list(pieces.bytes(token))}
    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, p) for t, p in e.top]} for e in entries]


class TextOffsets:
    """Character offsets of tokens in a completion's text, counted over the tokens' UTF-8 bytes
    (a character split over several tokens counts at the token that completes it)."""

    def __init__(self, pieces: TokenPieces) -> None:
        self.pieces, self.chars = pieces, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token: int) -> int:
        """The offset where ``token`` starts; moves past it (special tokens, not in the text, add nothing)."""
        start = self.chars
        if token not in self.pieces.specials:
            self.chars += len(self.decoder.decode(self.pieces.bytes(token)))
        return start


def completion_logprobs(pieces: TokenPieces, entries: list[TokenLogprob], offsets: TextOffsets) -> dict[str, list]:
    """OpenAI completions' ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text ->
    logprob, the chosen token included) and ``text_offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = pieces.text(e.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        top = None
        if e.logprob is not None:
            top = {pieces.text(t): p for t, p in e.top}
            top.setdefault(text, e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.take(e.token))
    return out
