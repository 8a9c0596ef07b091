"""Logit adjustments before sampling: logit bias and the penalties that depend on a sequence's tokens.

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

The state is two vocabulary-sized tensors per sequence (tokens seen, reply counts), updated by
one indexed add per token: each step costs a few vector operations, never a Python loop over
the vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Penalties:
    """One sequence's logit adjustments; :meth:`of` gives None when the options ask for none.

    Args:
        options: a :class:`~qlora.infer.generate.SamplingOptions` (``logit_bias``,
            ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``).
        prompt_ids: the prompt's token ids (the repetition penalty counts them; the others do not).
    """

    def __init__(self, options, prompt_ids: Sequence[int] | torch.Tensor) -> None:
        self.repetition = float(options.repetition_penalty)
        self.presence = float(options.presence_penalty)
        self.frequency = float(options.frequency_penalty)
        self.bias_items = dict(options.logit_bias or {})
        self.prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        self.reply: list[int] = []  # tokens added before the first call (the vocabulary size is not known yet)
        self.seen: torch.Tensor | None = None  # bool (vocab,): in the prompt or the reply
        self.counts: torch.Tensor | None = None  # float (vocab,): times in the reply
        self.bias: torch.Tensor | None = None

    @classmethod
    def of(cls, options, prompt_ids: Sequence[int] | torch.Tensor) -> "Penalties | None":
        """The adjustments ``options`` ask for, or None (then the logits are used as they are)."""
        if options.repetition_penalty == 1.0 and not options.presence_penalty and not options.frequency_penalty \
                and not options.logit_bias:
            return None
        return cls(options, prompt_ids)

    def add(self, token: int) -> None:
        """Count ``token`` as the reply's next token."""
        if self.counts is None:
            self.reply.append(token)
            return
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
            self.add(token)
