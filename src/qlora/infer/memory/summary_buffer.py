"""ConversationSummaryBufferMemory: recent exchanges verbatim, older ones summarized."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..messages import Message, buffer_string
from .base import BaseMemory, exchanges
from .summary import predict_new_summary
from .token_buffer import MessageTokens

if TYPE_CHECKING:
    from ..llm import LLM


class ConversationSummaryBufferMemory(BaseMemory):
    """Keeps exchanges word for word until they exceed ``max_token_limit`` tokens, then
    folds the oldest whole exchanges into the running summary.

    Tokens are counted per message as in
    :class:`~qlora.infer.memory.token_buffer.MessageTokens`; only the messages
    after the summary are read, so a turn costs the same however long the
    conversation is. The verbatim part always starts with a user turn.

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
        self.num_tokens = MessageTokens(tokenizer, self.human_prefix, self.ai_prefix)

    def buffer(self) -> list[Message]:
        return [m for _, m in self.session.entries(after=self.session.summary()[1])]

    def catch_up(self) -> None:
        """Fold the oldest exchanges into the summary until the rest fits the token limit."""
        summary, covered = self.session.summary()
        pending = list(exchanges(self.session.entries(after=covered)))
        total = sum(self.num_tokens(exchange.messages) for exchange in pending)
        folded = 0
        while folded < len(pending) and total > self.max_token_limit:
            total -= self.num_tokens(pending[folded].messages)
            folded += 1
        if folded:
            old = [m for exchange in pending[:folded] for m in exchange.messages]
            new = predict_new_summary(self.llm, summary, old, self.human_prefix, self.ai_prefix)
            self.session.set_summary(new, pending[folded - 1].through)

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        summary = self.session.summary()[0]
        messages = ([Message("system", summary)] if summary else []) + self.buffer()
        return {self.memory_key: self.format(messages)}

    def contents(self) -> str:
        summary = self.session.summary()[0]
        recent = buffer_string(self.buffer(), self.human_prefix, self.ai_prefix)
        return f"summary: {summary or '(none yet)'}\nrecent:\n{recent or '(none)'}"
