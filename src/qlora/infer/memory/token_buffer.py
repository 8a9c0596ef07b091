"""ConversationTokenBufferMemory: the most recent messages that fit a token budget."""

from __future__ import annotations

from typing import Any, Sequence

from ..messages import Message, buffer_string
from .base import BaseMemory


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` by the model's own tokenizer, without BOS/EOS."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


class ConversationTokenBufferMemory(BaseMemory):
    """Drops the oldest messages, one at a time, until the transcript fits.

    The count is of the ``Human: ...``/``AI: ...`` string, as in LangChain.

    Args:
        tokenizer: the model's tokenizer.
        max_token_limit: most tokens the kept transcript may have.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, tokenizer, max_token_limit: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.max_token_limit = max_token_limit

    def num_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of ``messages`` in transcript form."""
        return count_tokens(self.tokenizer, buffer_string(messages, self.human_prefix, self.ai_prefix))

    def buffer(self) -> list[Message]:
        messages = self.session.messages()
        start = 0
        while start < len(messages) and self.num_tokens(messages[start:]) > self.max_token_limit:
            start += 1
        return messages[start:]
