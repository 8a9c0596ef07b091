"""Conversation memories under LangChain's names and with its prompts and interface
(``save_context``, ``load_memory_variables``, ``clear``), differing where LangChain's
behaviour breaks real chats:

- recalled turns are always whole exchanges starting with a user message (LangChain's
  token and summary-buffer memories drop single messages and can leave a reply
  first, which strict chat templates reject);
- the full transcript is kept in the session; each memory computes what to show,
  reading only what it shows (token and window memories read from the newest message
  back), so a turn costs the same however long the conversation is;
- derived state (summary, entities, triples, vectors) carries the id of the last
  message it covers, so an interrupted run is caught up (:meth:`BaseMemory.catch_up`).
"""

from __future__ import annotations

from .base import BaseMemory
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
    "BaseMemory", "ConversationBufferMemory", "ConversationBufferWindowMemory", "ConversationTokenBufferMemory",
    "ConversationSummaryMemory", "ConversationSummaryBufferMemory", "ConversationEntityMemory",
    "ConversationKGMemory", "VectorStoreRetrieverMemory", "Session", "InMemorySession",
]
