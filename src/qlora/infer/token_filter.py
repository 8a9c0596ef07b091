"""Tokens a reply may not choose: vLLM's ``allowed_token_ids`` and ``bad_words``.

vLLM masks these logits to -inf before logit bias, penalties and sampling (its sampler's order),
so greedy decoding is changed by them too and logprobs (of the raw logits) are not:

- ``allowed_token_ids``: every other token is masked (an EOS left out of the list cannot end the
  reply).
- ``bad_words``: each word is tokenized twice, as written (leading spaces stripped) and after one
  space (the word inside a sentence), the second kept only when it is another token sequence of the
  same length (:func:`bad_word_ids`). A one-token sequence is always masked; a longer one has its last
  token masked when the reply's latest tokens (the reply's only, never the prompt's) are the others.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model_rules import masked

MAX_BAD_WORDS = 128  # token sequences per request, as vLLM's sampler takes at most


def bad_word_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """The token sequences ``words`` ban, as vLLM derives them (see the module docstring).

    Raises:
        ValueError: an empty word, one the tokenizer writes with no token, or more than
            :data:`MAX_BAD_WORDS` sequences.
    """
    sequences: list[list[int]] = []
    for word in dict.fromkeys(words):  # each word once, in order
        if not word:
            raise ValueError("a bad word is the empty string")
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            raise ValueError(f"the bad word {word!r} tokenizes to no token")
        sequences.append(bare)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            sequences.append(spaced)
    if len(sequences) > MAX_BAD_WORDS:
        raise ValueError(f"the bad words make {len(sequences)} token sequences; at most {MAX_BAD_WORDS} are taken")
    return sequences


class TokenFilter:
    """One request's masked tokens: all but ``allowed`` (None: no such limit) and the ``banned`` sequences'
    last tokens after their other tokens."""

    def __init__(self, allowed: Sequence[int] | None = None, banned: Sequence[Sequence[int]] = ()) -> None:
        self.allowed = None if allowed is None else frozenset(allowed)
        self.always = frozenset(s[0] for s in banned if len(s) == 1)
        self.after = [(list(s[:-1]), s[-1]) for s in banned if len(s) > 1]  # (prefix, banned last token)
        self._mask: torch.Tensor | None = None  # bool (vocab,): masked whatever the reply, built on first use

    def banned(self, reply: Sequence[int]) -> set[int]:
        """The tokens masked after ``reply`` (the reply's tokens so far) besides the fixed mask."""
        return {last for prefix, last in self.after
                if len(prefix) <= len(reply) and list(reply[len(reply) - len(prefix):]) == prefix}

    def allows(self, token: int, reply: Sequence[int]) -> bool:
        """Whether ``token`` may follow ``reply``."""
        return self.allower(reply)(token)

    def allower(self, reply: Sequence[int]) -> Callable[[int], bool]:
        """:meth:`allows` after ``reply`` for many tokens (a constraint's scan): the bad words' bans found once."""
        banned = self.banned(reply)
        return lambda token: (self.allowed is None or token in self.allowed) and token not in self.always \
            and token not in banned

    def __call__(self, logits: torch.Tensor, reply: Sequence[int]) -> torch.Tensor:
        """A copy of the 1-D ``logits`` with the tokens masked after ``reply`` at -inf."""
        if self._mask is None or self._mask.numel() != logits.numel() or self._mask.device != logits.device:
            self._mask = self._fixed_mask(logits.numel(), logits.device)
        return masked(logits.masked_fill(self._mask, float("-inf")), self.banned(reply))

    def _fixed_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        if self.allowed is None:
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        else:
            mask = torch.ones(vocab, dtype=torch.bool, device=device)
            kept = [t for t in self.allowed if t < vocab]
            mask[kept] = False
        mask[[t for t in self.always if t < vocab]] = True
        return mask
