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
    (a character split over several tokens counts at the token that completes it).

    An echoed prompt (``echo``, the text the choice opens with, whose ``echo_tokens`` entries lead) is the prompt
    as written, so its tokens are found in it: a special token counts where the text holds its literal (one the
    tokenizer added, such as BOS, adds nothing), and a word's leading space that the text lacks (SentencePiece's
    first word, which a decode drops) is not counted. The reply starts where the echo ends, whatever its tokens
    spelled; in it a special token adds its literal only where the reply shows special tokens (``shown``: vLLM's
    ``skip_special_tokens: false``)."""

    def __init__(self, pieces: TokenPieces, echo: str = "", shown: bool = False, echo_tokens: int = 0) -> None:
        self.pieces, self.chars, self.echo, self.shown = pieces, 0, echo, shown
        self.left = echo_tokens  # the echoed prompt's entries still to come
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token: int) -> int:
        """The offset where ``token`` starts; moves past its text."""
        echoed, self.left = self.left > 0, self.left - 1
        if self.left == -1 and self.echo:  # the reply's first token: just after the echoed text
            self.chars = len(self.echo)
            self.decoder.reset()
        start = self.chars
        if token in self.pieces.specials:
            literal = self.pieces.text(token)
            if self.echo.startswith(literal, start) if echoed else self.shown:
                self.chars += len(literal)
            return start
        piece = self.decoder.decode(self.pieces.bytes(token))
        if echoed and piece[:1] == " " and not self.echo.startswith(piece, start) and \
                self.echo.startswith(piece[1:], start):
            piece = piece[1:]
        self.chars += len(piece)
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
