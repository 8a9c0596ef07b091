"""ConversationBufferMemory: the whole conversation, every turn, in order."""

from __future__ import annotations

from .base import BaseMemory


class ConversationBufferMemory(BaseMemory):
    """Shows the model every past message; simplest, grows without bound."""
