"""Token log-probabilities: of the tokens a reply chose, and of a prompt's own tokens.

The numbers are ``log_softmax`` of the model's raw logits in fp32: before temperature,
top-p or a constraint reshape the distribution a token is drawn from. This is what
OpenAI reports and vLLM's default (``logprobs_mode="raw_logprobs"``), and it makes the
logprob of a text a property of the model alone, whatever the sampling options
(eval harnesses score loglikelihoods this way).

A token's text and bytes (OpenAI's ``token`` and ``bytes`` fields) are what it adds
to the reply: byte-level BPE tokens (GPT-2, Llama 3, Qwen) map their symbols back to
bytes, SentencePiece ``<0xNN>`` tokens are one byte, other tokens are their decoded
text (word-start spaces kept). A token holding part of a UTF-8 character has no text
of its own; its ``token`` is written ``bytes:\\xNN...``, as OpenAI does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .constrained import TokenTexts, per_tokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability (None: a prompt's first token, which nothing predicts)
    and the ``top`` most likely tokens at its position, best first, as ``(id, logprob)``; a prompt
    token's ``rank``: how many tokens of the vocabulary are at least as likely (1: the most likely)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


def chosen_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry from the 1-D next-token ``logits`` it was chosen from, with ``top`` alternatives."""
    logprobs = logits.float().log_softmax(-1)
    return TokenLogprob(token, float(logprobs[token]), _top(logprobs, top))


def prompt_logprobs(logits: torch.Tensor, ids: list[int], top: int) -> list[TokenLogprob]:
    """Entries for each of ``ids`` from the ``(len(ids), vocab)`` logits of a forward over them
    (row ``i`` predicts token ``i + 1``), with their ranks; the first token's logprob is None."""
    logprobs = logits[:len(ids) - 1].float().log_softmax(-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(-1, targets[:, None])
    ranks = (logprobs >= chosen).sum(-1).tolist()  # vLLM's rank: ties count as ahead
    tops = [()] * len(ranks)
    if top:
        values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [TokenLogprob(ids[0], None)] + [TokenLogprob(t, p, k, r) for t, p, k, r in
                                           zip(ids[1:], chosen[:, 0].tolist(), tops, ranks)]


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, indices = torch.topk(logprobs, min(k, logprobs.numel()))
    return tuple(zip(indices.tolist(), values.tolist()))


_PIECES: "weakref.WeakKeyDictionary[object, TokenPieces]" = weakref.WeakKeyDictionary()


class TokenPieces:
    """Each token's bytes and display text, computed on first use and cached (one per tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts = TokenTexts.of(tokenizer)
        self.specials = self.texts.specials
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def of(cls, tokenizer) -> "TokenPieces":
        return per_tokenizer(_PIECES, tokenizer, cls)

    def bytes(self, token: int) -> bytes:
        """The UTF-8 bytes ``token`` adds to a text (a special token: its literal)."""
        try:
            return self._bytes[token]
        except KeyError:
            pass
        value = self.texts.bytes(token, self.specials)
        if value is None:
            value = self.tokenizer.decode([token], skip_special_tokens=False).encode()
        self._bytes[token] = value
        return value

    def text(self, token: int) -> str:
        """``token``'s text; ``bytes:\\xNN..`` when its bytes are not whole UTF-8 characters."""
        value = self.bytes(token)
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in value)
