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
special tokens outside ``keep`` and tokens that decode to a partial UTF-8 character
(byte tokens) have none and are never chosen.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterator, Sequence

import torch

from .generate import SamplingOptions

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


class TokenTexts:
    """The text each token id adds to a reply, decoded on first use and cached (one per tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.specials = frozenset(tokenizer.all_special_ids)
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[-1:]
        self.anchor_text = tokenizer.decode(self.anchor)
        self._texts: dict[int, str | None] = {}

    @classmethod
    def of(cls, tokenizer) -> "TokenTexts":
        return per_tokenizer(_TEXTS, tokenizer, cls)

    def text(self, token: int, keep: frozenset[int] = frozenset()) -> str | None:
        """What ``token`` adds to the reply; None for a special token not in ``keep`` or a partial character."""
        if token in self.specials and token not in keep:
            return None
        try:
            return self._texts[token]
        except KeyError:
            pass
        if token in self.specials:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
        else:
            both = self.tokenizer.decode(self.anchor + [token], skip_special_tokens=False)
            text = both[len(self.anchor_text):] if both.startswith(self.anchor_text) else \
                self.tokenizer.decode([token], skip_special_tokens=False)
        text = None if "\ufffd" in text else text
        self._texts[token] = text
        return text


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
