"""Structured replies: decode a reply that is, by construction, one JSON value.

OpenAI's ``response_format`` (``{"type": "json_object"}``, or ``"json_schema"`` with a
schema) is served by constraining decoding, per request, with the validator forced tool
calls use (:mod:`qlora.infer.json_prefix`, :func:`qlora.infer.constrained.choose_token`):
only tokens keeping the reply the prefix of a JSON document valid under the schema's
enforced part (:mod:`qlora.infer.json_schema` says what is enforced, at every depth),
may be chosen; once the value is complete the best-scored end-of-turn token ends the
reply. Tokens are read as bytes (:meth:`~qlora.infer.constrained.TokenTexts.advance`), so a
string's character may be written raw in byte tokens, as well as escaped. The reply is whole
JSON unless the token limit cuts it first (``finish_reason`` ``"length"``, as OpenAI).
"""

from __future__ import annotations

import torch

from typing import Callable

from .constrained import TokenTexts, choose_token, masked_partial
from .generate import SamplingOptions
from .json_prefix import JsonPrefix
from .json_schema import Node


class JsonReply:
    """The per-request constraint of a JSON reply (see the module docstring).

    Args:
        tokenizer: the served tokenizer.
        schema: the compiled JSON Schema the reply follows (:func:`~qlora.infer.json_schema.compile_schema`'s
            root); None: any JSON value (an object if ``root_object``).
        stop_ids: end-of-turn tokens; the best-scored one ends the reply once the value is complete.
        root_object: without a schema, whether the value must be an object (``json_object``: yes).
    """

    prefix_ids: list[int] = []

    def __init__(self, tokenizer, schema: Node | None, stop_ids: frozenset[int],
                 root_object: bool = True) -> None:
        self.texts = TokenTexts.of(tokenizer)
        self.stop_ids = frozenset(stop_ids)
        self.state = JsonPrefix.start(schema, root_object)
        self.pending = b""  # a partial character's bytes

    @property
    def complete(self) -> bool:
        """Whether the reply so far is a whole valid value (it may end here)."""
        return not self.pending and self.state.complete

    def choose(self, logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
               allows: Callable[[int], bool] | None = None) -> int | None:
        """The next token of the reply among those ``allows`` allows (None: no token of the vocabulary continues it)."""
        if self.state.closed:
            stops = [t for t in self.stop_ids if t < logits.numel() and (allows is None or allows(t))]
            return max(stops, key=lambda t: float(logits[t])) if stops else None
        token = choose_token(masked_partial(logits, self.texts, self.pending), options, generator,
                             self.accepts if allows is None else lambda t: allows(t) and self.accepts(t))
        if token is not None and token not in self.stop_ids:
            self.state, self.pending = self._advance(token)  # type: ignore[misc]
        return token

    def _advance(self, token: int) -> tuple[JsonPrefix, bytes] | None:
        return self.texts.advance(token, self.pending, self.state.feed, JsonPrefix.admits)

    def accepts(self, token: int) -> bool:
        """Whether ``token`` may come next."""
        if token in self.stop_ids:  # a root number may end here or go on
            return self.complete
        text = None if self.pending else self.texts.text(token)
        if text:  # the common case first, without byte arithmetic: a token of whole characters
            return self.state.feed(text) is not None
        return self._advance(token) is not None
