"""Constrained decoding: pick the next token among those a text matcher accepts.

The logits are visited best first, in growing chunks (``topk`` of 16, 256, 4096, then
the rest), and each candidate's text is checked by the caller's ``accepts``; the whole
vocabulary is neither decoded nor checked at each step. Greedy decoding takes the first
accepted candidate. Sampling keeps the usual semantics restricted to the allowed
tokens: temperature, then top-k, top-p and min-p over the allowed tokens' renormalized
probabilities (min-p relative to the most likely allowed token). Without top-k/top-p/min-p,
the Gumbel-max trick makes sampling a greedy scan of noisy logits (exact, and as cheap as
greedy). With them, the scan stops once the nucleus is settled (the same whether the
unchecked tokens add no allowed mass or all of theirs), or (min-p without top-p) once a token falls
under min-p, or the unchecked rest is under 0.1% of the allowed mass, or 1024 candidates
were checked and one was allowed (only a near-flat distribution gets that far; its
nucleus is then taken among those first 1024).

A token's text is what it adds to the reply as :class:`~qlora.infer.text_stream.TextStream`
shows it, taken after an anchor token so that SentencePiece's word-start spaces are kept;
special tokens outside ``keep`` have none and are never chosen. A token holding part of a
character (a SentencePiece ``<0xNN>`` byte token, a byte-level BPE token cut inside a character)
has no text of its own but has bytes: :meth:`TokenTexts.advance` reads a token as bytes
(:mod:`qlora.infer.utf8`), so a constraint takes any character its rule allows, whole or in
pieces, and a partial character only while the rule allows some character it may become. While
one is pending, only tokens beginning with a continuation byte can follow, and the others are
masked (:meth:`TokenTexts.continuations`) before the scan, so the scan stays short.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .generate import SamplingOptions
from .text_stream import byte_token_ids
from .utf8 import span, split

_CHUNKS = (16, 256, 4096)
_REST_TOLERANCE = 1e-3
_SCAN_CAP = 1024

_TEXTS: "weakref.WeakKeyDictionary[object, TokenTexts]" = weakref.WeakKeyDictionary()


def per_tokenizer(cache: weakref.WeakKeyDictionary, tokenizer, make: Callable):
    """``make(tokenizer)``, computed once per tokenizer and shared while it lives (not shared for a
    tokenizer that cannot be weakly referenced)."""
    try:
        return cache[tokenizer]
    except (KeyError, TypeError):
        value = make(tokenizer)
    try:
        cache[tokenizer] = value
    except TypeError:
        pass
    return value


S = TypeVar("S")


class TokenTexts:
    """The text and bytes each token id adds to a reply, decoded on first use and cached (one per tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = frozenset(tokenizer.all_special_ids)
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[-1:]
        self.anchor_text = tokenizer.decode(self.anchor)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)
        self.byte_ids = byte_token_ids(tokenizer)  # SentencePiece's <0xNN>
        self._decoded: dict[int, str] = {}
        self._texts: dict[int, str | None] = {}
        self._bytes: dict[int, bytes | None] = {}
        self._continuations: dict[tuple[torch.device, int], torch.Tensor] = {}

    @classmethod
    def of(cls, tokenizer) -> "TokenTexts":
        return per_tokenizer(_TEXTS, tokenizer, cls)

    def decoded(self, token: int) -> str:
        """``token`` decoded as it reads inside a text (U+FFFD for the bytes of a partial character)."""
        try:
            return self._decoded[token]
        except KeyError:
            pass
        if token in self.specials:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
        else:
            both = self.tokenizer.decode(self.anchor + [token], skip_special_tokens=False)
            text = both[len(self.anchor_text):] if both.startswith(self.anchor_text) else \
                self.tokenizer.decode([token], skip_special_tokens=False)
        self._decoded[token] = text
        return text

    def text(self, token: int, keep: frozenset[int] = frozenset()) -> str | None:
        """What ``token`` adds to the reply; None for a special token not in ``keep`` or a partial character."""
        if token in self.specials and token not in keep:
            return None
        try:
            return self._texts[token]
        except KeyError:
            pass
        text = self.decoded(token)
        text = self._texts[token] = None if "\ufffd" in text else text
        return text

    def bytes(self, token: int, keep: frozenset[int] = frozenset()) -> bytes | None:
        """The UTF-8 bytes ``token`` adds to the reply (whole characters or not); None for a special token not in
        ``keep``, or a token whose bytes the tokenizer does not show (its decoding is not theirs)."""
        text = self.text(token, keep)
        if text is not None:
            return text.encode()
        if token in self.specials:
            return None
        try:
            return self._bytes[token]
        except KeyError:
            pass
        raw = self.tokenizer.convert_ids_to_tokens(token)
        value = None
        if token in self.byte_ids:
            value = bytes([int(raw[3:5], 16)])
        elif self.byte_level and isinstance(raw, str) and all(c in UNICODE_TO_BYTE for c in raw):
            value = bytes(UNICODE_TO_BYTE[c] for c in raw)
        if value is not None and value.decode("utf-8", "replace") != self.decoded(token):
            value = None  # not what decoding shows: the mapping does not hold for this tokenizer
        self._bytes[token] = value
        return value

    def continuations(self, vocab: int, device: torch.device) -> torch.Tensor:
        """A bool mask (``vocab``,) of the tokens whose bytes may begin with a UTF-8 continuation byte (all that
        may follow a partial character); a superset read from the token strings, without decoding the vocabulary."""
        key = (torch.device(device), vocab)
        mask = self._continuations.get(key)
        if mask is None:
            ids = [t for t in self.byte_ids if 0x80 <= int(self.tokenizer.convert_ids_to_tokens(t)[3:5], 16) <= 0xBF]
            if self.byte_level:
                ids += [i for t, i in self.tokenizer.get_vocab().items()
                        if t and 0x80 <= UNICODE_TO_BYTE.get(t[0], 0) <= 0xBF]
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[[i for i in ids if i < vocab]] = True
            mask = self._continuations[key] = mask.to(device)
        return mask

    def advance(self, token: int, pending: bytes, feed: Callable[[str], S | None],
                admits: Callable[[S, int, int], bool], keep: frozenset[int] = frozenset()) -> tuple[S, bytes] | None:
        """A constraint's state after ``token``, read as bytes, and the partial character then pending; None when the
        token may not come next.

        Args:
            token: the candidate.
            pending: the bytes of the partial character before it (``b""``: none).
            feed: the constraint's state after some whole characters (None: they break its rule).
            admits: whether, in a state, some code point in ``low..high`` may come next.
            keep: special tokens whose text counts.
        """
        if not pending:
            text = self.text(token, keep)
            if text is not None:  # whole characters: no byte arithmetic
                if not text:
                    return None
                state = feed(text)
                return None if state is None else (state, b"")
        data = self.bytes(token, keep)
        if not data or (0x80 <= data[0] <= 0xBF) != bool(pending):  # only a partial character takes a continuation
            return None
        parts = split(pending + data)
        if parts is None:
            return None
        text, tail = parts
        state = feed(text)
        if state is None or (tail and not admits(state, *span(tail))):  # type: ignore[misc]
            return None
        return state, tail


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte, reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def masked_partial(logits: torch.Tensor, texts: TokenTexts, pending: bytes) -> torch.Tensor:
    """``logits`` with the tokens that cannot follow ``pending`` (a partial character) at -inf; as is without one."""
    if not pending:
        return logits
    return logits.masked_fill(~texts.continuations(logits.numel(), logits.device), float("-inf"))


def literal_ids(tokenizer, text: str, keep: frozenset[int] = frozenset()) -> list[int] | None:
    """Token ids that spell exactly ``text`` (as :class:`TokenTexts` reads them), or None if the
    tokenizer's own encoding does not (SentencePiece may prefix a space that is not in ``text``)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    texts = TokenTexts.of(tokenizer)
    pieces = [texts.text(i, keep) for i in ids]
    return ids if None not in pieces and "".join(pieces) == text else None  # type: ignore[arg-type]


def _descending(scores: torch.Tensor) -> Iterator[tuple[int, float]]:
    """``(token, score)`` best first, sorting no more of the vocabulary than is read."""
    n, done = scores.numel(), 0
    for k in (*_CHUNKS, n):
        k = min(k, n)
        if k <= done:
            continue
        values, ids = torch.topk(scores, k)
        yield from zip(ids[done:].tolist(), values[done:].tolist())
        done = k
        if done == n:
            return


def choose_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
                 accepts: Callable[[int], bool], preferred: Sequence[int] = ()) -> int | None:
    """The next token among those ``accepts`` allows (None: no token of the vocabulary is allowed).

    Args:
        logits: 1-D next-token logits.
        options: temperature, top_k, top_p and min_p, applied to the allowed tokens only.
        generator: the request's seeded generator (sampling).
        accepts: whether a token id may come next.
        preferred: ids taken before looking at the logits, the first one allowed (a literal's own spelling).
    """
    for token in preferred:
        if accepts(token):
            return token
    if options.temperature <= 0:
        return next((t for t, _ in _descending(logits) if accepts(t)), None)
    if options.top_p >= 1.0 and options.top_k <= 0 and options.min_p <= 0:
        # Gumbel-max: the best allowed token by logit / T + Gumbel noise is an exact sample of the
        # allowed tokens' renormalized distribution, found with as few checks as a greedy pick.
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        noisy = logits.float() / options.temperature - torch.log(-torch.log(uniform.clamp_(1e-20, 1.0 - 1e-7)))
        return next((t for t, _ in _descending(noisy) if accepts(t)), None)
    probs = (logits.float() / options.temperature).softmax(-1)
    found: list[tuple[int, float]] = []
    allowed = seen = 0.0
    total = None  # the allowed mass top-p is taken of, once known well enough
    for checked, (token, p) in enumerate(_descending(probs), 1):
        if options.min_p > 0 and options.top_p >= 1.0 and found and p < options.min_p * found[0][1]:
            break  # this and every later token fall under min-p: the allowed ones found so far are the set
        seen += p
        if accepts(token):
            found.append((token, p))
            allowed += p
            if 0 < options.top_k <= len(found):
                total = allowed  # top-k first: top-p is a share of the k tokens' mass
                break
        if not found:
            continue
        rest = max(0.0, 1.0 - seen)  # what the unchecked tokens may add to the allowed mass
        # The nucleus is settled when it is the same whether they add nothing or all of it.
        if allowed >= options.top_p * (allowed + rest) and \
                _nucleus(found, allowed, options.top_p) == _nucleus(found, allowed + rest, options.top_p):
            total = allowed + rest
            break
        if rest <= _REST_TOLERANCE * (allowed + rest) or checked >= _SCAN_CAP:
            total = allowed + rest
            break
    if not found:
        return None
    keep = max(1, _nucleus(found, total if total is not None else allowed, options.top_p))
    keep = min(keep, sum(p >= options.min_p * found[0][1] for _, p in found))  # the first always stays
    weights = torch.tensor([p for _, p in found[:keep]], dtype=torch.float64)
    if float(weights.sum()) <= 0:  # underflow: every allowed token is far down the distribution
        weights = torch.ones(keep, dtype=torch.float64)
    device = generator.device if generator is not None else "cpu"
    pick = int(torch.multinomial(weights.to(device), 1, generator=generator))
    return found[pick][0]


def _nucleus(found: list[tuple[int, float]], total: float, top_p: float) -> int:
    """How many of ``found`` (best first) the top-p nucleus of allowed mass ``total`` holds: each token whose
    predecessors hold less than ``top_p`` of it (the one crossing the threshold stays, as in :func:`next_token`)."""
    before, count = 0.0, 0
    for _, p in found:
        if before >= top_p * total:
            break
        before += p
        count += 1
    return count
