"""ConversationTokenBufferMemory: the most recent exchanges that fit a token budget."""

from __future__ import annotations

from typing import Any, Sequence

from ..messages import Message, buffer_string
from .base import BaseMemory

_CACHE_ENTRIES = 4096


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of ``text`` by the model's own tokenizer, without BOS/EOS."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


class MessageTokens:
    """Token counts of messages, by the rule LangChain's ``get_num_tokens_from_messages``
    uses: each message counted alone as its ``"Human: ..."``/``"AI: ..."`` line, summed
    (no newline between messages is counted). Counts are cached: a message already
    seen is not tokenized again."""

    def __init__(self, tokenizer, human_prefix: str = "Human", ai_prefix: str = "AI") -> None:
        self.tokenizer = tokenizer
        self.prefixes = (human_prefix, ai_prefix)
        self._cache: dict[str, int] = {}

    def __call__(self, messages: Sequence[Message]) -> int:
        total = 0
        for message in messages:
            line = buffer_string([message], *self.prefixes)  # keyed by its line: tool calls make a Message unhashable
            count = self._cache.get(line)
            if count is None:
                count = count_tokens(self.tokenizer, line)
                if len(self._cache) >= _CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[line] = count
            total += count
        return total


class ConversationTokenBufferMemory(BaseMemory):
    """The newest whole exchanges whose messages fit ``max_token_limit`` tokens.

    The session is read from the newest message back and the scan stops at the
    first exchange that no longer fits, so a turn costs the same at 10,000
    exchanges as at 10 (``bench/chat_memory.py``). Tokens are counted per message
    as LangChain does (see :class:`MessageTokens`). Unlike LangChain, which drops
    single messages and can leave a reply first, whole exchanges are dropped, so
    the history always starts with a user turn.

    Args:
        tokenizer: the model's tokenizer.
        max_token_limit: most tokens the kept messages may have.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, tokenizer, max_token_limit: int = 2000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.max_token_limit = max_token_limit
        self.num_tokens = MessageTokens(tokenizer, self.human_prefix, self.ai_prefix)

    def buffer(self) -> list[Message]:
        kept: list[Message] = []
        pending: list[Message] = []  # the exchange being read, newest message first
        used = 0
        for _, message in self.session.newest():
            pending.append(message)
            if message.role != "user":
                continue
            used += self.num_tokens(pending)
            if used > self.max_token_limit:
                break
            kept += pending
            pending = []
        return kept[::-1]
