"""The token rules a model's ``generation_config`` sets, which transformers' ``generate`` applies by default.

A checkpoint's generation config (``generation_config.json``, or for older checkpoints config.json, as
transformers derives one) can ask every decoding of the model to force or forbid tokens: BART, Marian and
Pegasus force EOS as the last token at the length limit (``forced_eos_token_id``), mBART-style translators
force a language id first (``forced_bos_token_id``), Whisper-like configs suppress tokens (``suppress_tokens``,
``begin_suppress_tokens``), Blenderbot never repeats a 3-gram of its prompt (``encoder_no_repeat_ngram_size``).
``generate`` turns each into a logits processor (``GenerationMixin._get_logits_processor``); qlora applies the
same rules, in the same order and with the same length conditions, after its own penalties (see
:class:`qlora.infer.penalties.Penalties`), so greedy decoding keeps giving ``generate``'s tokens.

Lengths follow ``generate`` for a decoder-only model: the sequence is the prompt and the reply so far, "the
prompt" is the whole prompt, and the length limit is the reply's ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class ModelRules:
    """The rules of one model's generation config; :meth:`of` gives None when it sets none.

    ``repetition_penalty`` is not a rule here but the default of the option of that name (see
    :class:`qlora.infer.penalties.Penalties`): a user's value replaces the model's.
    """

    eos: tuple[int, ...] = ()  # generation_config.eos_token_id: what min_length and the length penalty act on
    forced_bos: int | None = None
    forced_eos: tuple[int, ...] = ()
    suppress: tuple[int, ...] = ()
    begin_suppress: tuple[int, ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    no_repeat_ngram: int = 0
    prompt_no_repeat_ngram: int = 0  # encoder_no_repeat_ngram_size: a decoder-only model's "encoder" is its prompt
    min_length: int = 0  # prompt and reply together
    min_new_tokens: int = 0
    length_decay: tuple[int, float] | None = None  # exponential_decay_length_penalty: (start, factor)
    repetition_penalty: float | None = None

    @classmethod
    def of(cls, model) -> "ModelRules | None":
        """The rules ``model.generation_config`` sets, or None."""
        config = getattr(model, "generation_config", None)
        if config is None:
            return None
        eos = _ids(getattr(config, "eos_token_id", None))
        bad = tuple(tuple(int(t) for t in seq) for seq in getattr(config, "bad_words_ids", None) or ()
                    if seq and not (len(seq) == 1 and int(seq[0]) in eos))  # generate never bans an EOS alone
        decay = getattr(config, "exponential_decay_length_penalty", None)
        penalty = getattr(config, "repetition_penalty", None)
        min_new = getattr(config, "min_new_tokens", None)  # when set, generate drops min_length for it
        rules = cls(eos=eos, forced_bos=getattr(config, "forced_bos_token_id", None),
                    forced_eos=_ids(getattr(config, "forced_eos_token_id", None)),
                    suppress=_ids(getattr(config, "suppress_tokens", None)),
                    begin_suppress=_ids(getattr(config, "begin_suppress_tokens", None)), bad_words=bad,
                    no_repeat_ngram=int(getattr(config, "no_repeat_ngram_size", None) or 0),
                    prompt_no_repeat_ngram=int(getattr(config, "encoder_no_repeat_ngram_size", None) or 0),
                    min_length=int(getattr(config, "min_length", None) or 0) if eos and min_new is None else 0,
                    min_new_tokens=int(min_new or 0) if eos else 0,
                    length_decay=(int(decay[0]), float(decay[1])) if decay and eos else None,
                    repetition_penalty=float(penalty) if penalty not in (None, 1.0) else None)
        return None if rules == cls(eos=eos) else rules

    def apply(self, logits: torch.Tensor, sequence: Sequence[int], prompt_length: int,
              max_new_tokens: int, prompt_ngrams: dict | None = None, ngrams: dict | None = None,
              allows: Callable[[int], bool] | None = None) -> torch.Tensor:
        """``logits`` (1-D fp32) for the token after ``sequence`` (the prompt's ``prompt_length`` tokens and the
        reply so far), changed as ``generate``'s processors change them, in their order.

        Args:
            prompt_ngrams: :func:`ngram_table` of the prompt (for ``prompt_no_repeat_ngram``).
            ngrams: :func:`ngram_table` of ``sequence`` so far (for ``no_repeat_ngram``).
            allows: the request's own mask (vLLM's ``allowed_token_ids``, ``bad_words``): a forced token it
                masks is not forced (none left: that rule is skipped), so the reply goes on with the tokens it
                allows rather than ending on one it masked.
        """
        length, vocab = len(sequence), logits.numel()
        banned: set[int] = set()
        if self.no_repeat_ngram and length >= self.no_repeat_ngram:
            banned.update((ngrams or {}).get(tuple(sequence[length + 1 - self.no_repeat_ngram:]), ()))
        if self.prompt_no_repeat_ngram:  # the prefix is sliced as generate slices it, even before n - 1 tokens
            start = length + 1 - self.prompt_no_repeat_ngram
            banned.update((prompt_ngrams or {}).get(tuple(sequence[start:length]), ()))
        for word in self.bad_words:
            before = word[:-1]
            if len(before) <= length and tuple(sequence[length - len(before):]) == before:
                banned.add(word[-1])
        logits = masked(logits, banned)
        if length < self.min_length or length - prompt_length < self.min_new_tokens:
            logits = masked(logits, self.eos)
        if self.forced_bos is not None and length == 1:
            logits = _forced(logits, (self.forced_bos,), allows)
        if self.forced_eos and length - prompt_length == max_new_tokens - 1:
            logits = _forced(logits, self.forced_eos, allows)
        if self.length_decay is not None and length > self.length_decay[0] + prompt_length:
            eos = torch.tensor([t for t in self.eos if t < vocab], dtype=torch.long, device=logits.device)
            scores = logits[eos]
            step = length - self.length_decay[0] - prompt_length
            penalty = (scores.abs() * (self.length_decay[1] ** step - 1)).masked_fill(~scores.isfinite(), 0.0)
            logits = logits.index_add(0, eos, penalty)
        logits = masked(logits, self.suppress)
        begin = prompt_length + (1 if prompt_length == 1 and self.forced_bos is not None else 0)
        if length == begin:
            logits = masked(logits, self.begin_suppress)
        return logits


def ngram_table(tokens: Sequence[int], n: int, table: dict | None = None, start: int = 0) -> dict:
    """``table`` (a new one when None) with the n-grams of ``tokens`` that end at index ``start + n - 1`` or
    later: the first ``n - 1`` tokens of each -> the set of tokens that followed them."""
    table = {} if table is None else table
    for i in range(max(start, 0), len(tokens) - n + 1):
        table.setdefault(tuple(tokens[i:i + n - 1]), set()).add(tokens[i + n - 1])
    return table


def _ids(value) -> tuple[int, ...]:
    """One id, a list of ids, a tensor or None as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(t) for t in value.reshape(-1).tolist())
    return (int(value),) if isinstance(value, int) else tuple(int(t) for t in value)


def masked(logits: torch.Tensor, ids) -> torch.Tensor:
    """``logits`` with the ids (those inside the vocabulary) set to -inf."""
    ids = [t for t in ids if 0 <= t < logits.numel()]
    if not ids:
        return logits
    return logits.index_fill(0, torch.tensor(ids, dtype=torch.long, device=logits.device), float("-inf"))


def _forced(logits: torch.Tensor, ids: tuple[int, ...], allows: Callable[[int], bool] | None = None) -> torch.Tensor:
    """-inf everywhere but ``ids`` (those ``allows`` allows; none: ``logits`` as they are), which get 0: one of
    them must come next."""
    ids = tuple(t for t in ids if 0 <= t < logits.numel() and (allows is None or allows(t)))
    if not ids and allows is not None:
        return logits
    forced = torch.full_like(logits, float("-inf"))
    forced[list(ids)] = 0.0
    return forced
