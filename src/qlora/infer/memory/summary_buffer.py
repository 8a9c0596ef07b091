"""ConversationSummaryBufferMemory: recent turns verbatim, older ones summarized."""

from __future__ import annotations

from typing import Any

from ..llm import LLM
from ..messages import Message, buffer_string
from .summary import predict_new_summary
from .token_buffer import count_tokens
from .base import BaseMemory


class ConversationSummaryBufferMemory(BaseMemory):
    """Keeps turns word for word until they exceed ``max_token_limit`` tokens, then
    folds the oldest into the running summary.

    Args:
        llm: writes the summary.
        tokenizer: the model's tokenizer, to count tokens.
        max_token_limit: most tokens of verbatim transcript kept.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, llm: LLM, tokenizer, max_token_limit: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_token_limit = max_token_limit

    def _tokens(self, messages: list[Message]) -> int:
        return count_tokens(self.tokenizer, buffer_string(messages, self.human_prefix, self.ai_prefix))

    def buffer(self) -> list[Message]:
        return self.session.messages()[self.session.summary()[1]:]

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        super().save_context(inputs, outputs)
        summary, covered = self.session.summary()
        buffer = self.session.messages()[covered:]
        pruned = 0
        while pruned < len(buffer) and self._tokens(buffer[pruned:]) > self.max_token_limit:
            pruned += 1
        if pruned:
            new = predict_new_summary(self.llm, summary, buffer[:pruned], self.human_prefix, self.ai_prefix)
            self.session.set_summary(new, covered + pruned)

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        summary = self.session.summary()[0]
        messages = ([Message("system", summary)] if summary else []) + self.buffer()
        return {self.memory_key: self.format(messages)}

    def contents(self) -> str:
        summary = self.session.summary()[0]
        recent = buffer_string(self.buffer(), self.human_prefix, self.ai_prefix)
        return f"summary: {summary or '(none yet)'}\nrecent:\n{recent or '(none)'}"
