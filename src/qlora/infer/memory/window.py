"""ConversationBufferWindowMemory: only the last ``k`` exchanges."""

from __future__ import annotations

from typing import Any

from ..messages import Message
from .base import BaseMemory


class ConversationBufferWindowMemory(BaseMemory):
    """Shows the last ``k`` user/assistant pairs, so the prompt stays bounded.

    Args:
        k: number of exchanges kept (``2 * k`` messages).
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.k = k

    def buffer(self) -> list[Message]:
        return self.session.messages()[-self.k * 2:] if self.k > 0 else []
