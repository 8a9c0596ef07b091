"""OpenAI's shapes of token logprobs in a reply: chat's ``logprobs.content`` and completions' ``logprobs``.

The numbers come from the batcher's events (:mod:`qlora.infer.logprobs`); this module only
writes them as OpenAI clients and eval harnesses read them, and as vLLM writes its extras: with
``return_tokens_as_token_ids`` each token (chosen or alternative) is written ``token_id:<id>`` (its
``bytes`` stay its text's), and ``prompt_logprobs`` (:func:`prompt_logprob_maps`).
"""

from __future__ import annotations

import codecs
from typing import Any

from ..infer.logprobs import TokenLogprob, TokenPieces


def _name(pieces: TokenPieces, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else pieces.text(token)


def chat_logprobs(pieces: TokenPieces, entries: list[TokenLogprob], as_ids: bool = False) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content``: token, logprob, bytes and the top alternatives of each token."""
    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": _name(pieces, token, as_ids), "logprob": logprob, "bytes": list(pieces.bytes(token))}
    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, p) for t, p in e.top]} for e in entries]


def prompt_logprob_maps(pieces: TokenPieces, entries: list[TokenLogprob], top: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: for each prompt token (the first: null) a map of token id -> ``logprob``,
    ``rank`` (1: the most likely) and ``decoded_token``, holding the prompt token first, then the ``top`` most
    likely tokens (ranked 1 to ``top``) that are not it."""
    out: list[dict[str, Any] | None] = []
    for e in entries:
        if e.logprob is None:
            out.append(None)
            continue
        ranked = {e.token: (e.logprob, e.rank)}
        for rank, (token, logprob) in enumerate(e.top[:top], 1):
            ranked.setdefault(token, (logprob, rank))
        out.append({str(t): {"logprob": p, "rank": r, "decoded_token": pieces.text(t)} for t, (p, r) in ranked.items()})
    return out


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


def completion_logprobs(pieces: TokenPieces, entries: list[TokenLogprob], offsets: TextOffsets,
                        as_ids: bool = False) -> dict[str, list]:
    """OpenAI completions' ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text ->
    logprob, the chosen token included) and ``text_offset``."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        text = _name(pieces, e.token, as_ids)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        top = None
        if e.logprob is not None:
            top = {_name(pieces, t, as_ids): p for t, p in e.top}
            top.setdefault(text, e.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offsets.take(e.token))
    return out
