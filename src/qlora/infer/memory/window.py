"""ConversationBufferWindowMemory: only the last ``k`` exchanges."""

from __future__ import annotations

from typing import Any

from ..messages import Message
from .base import BaseMemory, recent_exchanges


class ConversationBufferWindowMemory(BaseMemory):
    """Shows the last ``k`` user/assistant pairs, so the prompt stays bounded.

    Only those messages are read from the session, so a turn costs the same
    however long the conversation is.

    Args:
        k: number of exchanges kept (``2 * k`` messages).
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k

    def buffer(self) -> list[Message]:
        return recent_exchanges(self.session, self.k)
