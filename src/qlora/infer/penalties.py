"""Logit adjustments before sampling: logit bias, the penalties that depend on a sequence's tokens, and the
model's own token rules.

Applied to the raw logits, before temperature and the top-k/top-p/min-p filters (see
:func:`qlora.infer.generate.sampling_probs`), in the order transformers' ``generate`` and
vLLM apply them, so greedy decoding is changed by them too:

1. ``logit_bias``: a constant added to chosen token ids (OpenAI's ``logit_bias``; transformers
   applies its ``sequence_bias`` first as well).
2. ``repetition_penalty`` (CTRL, transformers' ``RepetitionPenaltyLogitsProcessor``): for every
   token in the prompt or the reply so far, a positive logit is divided by the penalty, a negative
   one multiplied.
3. ``frequency_penalty`` and ``presence_penalty`` (OpenAI, vLLM):
   ``logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)``, with ``count``
   over the reply's tokens only.
4. The rules of the model's generation config (:class:`qlora.infer.model_rules.ModelRules`: forced EOS at
   the length limit, forced BOS, suppressed and banned tokens, n-grams never repeated, a minimum length),
   in ``generate``'s order. Its ``repetition_penalty`` is the default of the option of that name.

The state is two vocabulary-sized tensors per sequence (tokens seen, reply counts), updated by
one indexed add per token: each step costs a few vector operations, never a Python loop over
the vocabulary.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model_rules import ModelRules, ngram_table


class Penalties:
    """One sequence's logit adjustments; :meth:`of` gives None when the options ask for none.

    Args:
        options: a :class:`~qlora.infer.generate.SamplingOptions` (``logit_bias``,
            ``repetition_penalty``: None for the model's, ``presence_penalty``, ``frequency_penalty``,
            ``max_new_tokens``).
        prompt_ids: the prompt's token ids (the repetition penalty counts them; the others do not).
        rules: the model's (:meth:`ModelRules.of`), or None.
    """

    def __init__(self, options, prompt_ids: Sequence[int] | torch.Tensor, rules: ModelRules | None = None) -> None:
        self.repetition = float(_repetition(options, rules))
        self.presence = float(options.presence_penalty)
        self.frequency = float(options.frequency_penalty)
        self.bias_items = dict(options.logit_bias or {})
        self.prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        self.reply: list[int] = []  # tokens added before the first call (the vocabulary size is not known yet)
        self.seen: torch.Tensor | None = None  # bool (vocab,): in the prompt or the reply
        self.counts: torch.Tensor | None = None  # float (vocab,): times in the reply
        self.bias: torch.Tensor | None = None
        self.rules = rules
        self.allows: Callable[[int], bool] | None = None  # the request's own mask, which forced tokens yield to
        self.max_new_tokens = int(options.max_new_tokens)
        self.sequence: list[int] = self.prompt.tolist()  # prompt and reply: what the model's rules look at
        self.ngrams = ngram_table(self.sequence, rules.no_repeat_ngram) if rules and rules.no_repeat_ngram else None
        self.prompt_ngrams = ngram_table(self.sequence, rules.prompt_no_repeat_ngram) \
            if rules and rules.prompt_no_repeat_ngram else None

    @classmethod
    def of(cls, options, prompt_ids: Sequence[int] | torch.Tensor,
           rules: ModelRules | None = None) -> "Penalties | None":
        """The adjustments ``options`` and the model's ``rules`` ask for, or None (then the logits are used as
        they are)."""
        if rules is None and _repetition(options, rules) == 1.0 and not options.presence_penalty \
                and not options.frequency_penalty and not options.logit_bias:
            return None
        return cls(options, prompt_ids, rules)

    def add(self, token: int) -> None:
        """Count ``token`` as the reply's next token."""
        self.sequence.append(token)
        if self.ngrams is not None:  # the one n-gram this token completes
            n = self.rules.no_repeat_ngram
            ngram_table(self.sequence, n, self.ngrams, len(self.sequence) - n)
        if self.counts is None:
            self.reply.append(token)
            return
        self._count(token)

    def _count(self, token: int) -> None:
        if 0 <= token < self.counts.numel():
            self.counts[token] += 1
            self.seen[token] = True

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The adjusted copy (fp32) of the 1-D next-token ``logits``."""
        if self.counts is None:
            self._start(logits.numel(), logits.device)
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.repetition != 1.0:
            penalized = torch.where(logits < 0, logits * self.repetition, logits / self.repetition)
            logits = torch.where(self.seen, penalized, logits)
        if self.frequency:
            logits = logits - self.frequency * self.counts
        if self.presence:
            logits = logits - self.presence * (self.counts > 0).float()
        if self.rules is not None:
            logits = self.rules.apply(logits, self.sequence, self.prompt.numel(), self.max_new_tokens,
                                      self.prompt_ngrams, self.ngrams, self.allows)
        return logits

    def _start(self, vocab: int, device: torch.device) -> None:
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        prompt = self.prompt[(self.prompt >= 0) & (self.prompt < vocab)].to(device)
        self.seen[prompt] = True  # ids past the logits (a padded tokenizer's extras) are never sampled anyway
        if self.bias_items:
            ids = [t for t in self.bias_items if 0 <= t < vocab]
            self.bias = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.bias[torch.tensor(ids, dtype=torch.long, device=device)] = \
                torch.tensor([float(self.bias_items[t]) for t in ids], device=device)
        reply, self.reply = self.reply, []
        for token in reply:
            self._count(token)


def _repetition(options, rules: ModelRules | None) -> float:
    """The repetition penalty: the option's, else the model's generation config's, else 1 (off)."""
    if options.repetition_penalty is not None:
        return options.repetition_penalty
    return rules.repetition_penalty if rules is not None and rules.repetition_penalty is not None else 1.0
