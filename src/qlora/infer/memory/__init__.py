"""Conversation memories under LangChain's names, with LangChain's behaviour."""

from __future__ import annotations

from .buffer import ConversationBufferMemory
from .entity import ConversationEntityMemory
from .kg import ConversationKGMemory
from .session import InMemorySession, Session
from .summary import ConversationSummaryMemory
from .summary_buffer import ConversationSummaryBufferMemory
from .token_buffer import ConversationTokenBufferMemory
from .vector import VectorStoreRetrieverMemory
from .window import ConversationBufferWindowMemory

__all__ = [
    "ConversationBufferMemory", "ConversationBufferWindowMemory", "ConversationTokenBufferMemory",
    "ConversationSummaryMemory", "ConversationSummaryBufferMemory", "ConversationEntityMemory",
    "ConversationKGMemory", "VectorStoreRetrieverMemory", "Session", "InMemorySession",
]
