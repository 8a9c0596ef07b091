"""The conversations ``qlora serve`` keeps (OpenAI's Conversations API, ``/v1/conversations``).

A conversation is a list of Responses items (messages, function calls and their outputs, each with
an id) and its metadata. A response created with ``conversation`` reads the conversation's items
before its own input, and once it has finished (``completed`` or ``incomplete``) its input items and
output items are appended to the conversation, as on OpenAI's platform.

Kept in memory and bounded like the responses (:mod:`qlora.serve.response_store`): the newest
``capacity`` conversations stay, the least recently used one is dropped first, and a restart forgets
them all.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .protocol import APIError, KnownFields
from .response_store import with_ids
from .responses import ResponsesRequest

DEFAULT_CAPACITY = 1000
MAX_ADDED_ITEMS = 20  # OpenAI's limit on the items one request adds
MAX_METADATA = 16


class CreateBody(KnownFields):
    """The body of ``POST /v1/conversations``."""

    items: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] | None = None


class UpdateBody(KnownFields):
    """The body of ``POST /v1/conversations/{id}``: the new metadata (all of it)."""

    metadata: dict[str, Any] | None


class ItemsBody(KnownFields):
    """The body of ``POST /v1/conversations/{id}/items``."""

    items: list[dict[str, Any]]


@dataclass
class Conversation:
    id: str
    created_at: int
    metadata: dict[str, str]
    items: list[dict[str, Any]] = field(default_factory=list)

    def object(self) -> dict[str, Any]:
        """The ``conversation`` object the API returns (its items are listed separately)."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def item(self, item_id: str) -> dict[str, Any]:
        """The item ``item_id``; a 404 naming it and the conversation when it has none such."""
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise APIError(404, f"Item with id {item_id!r} not found in conversation {self.id!r}.", "item_id", "not_found")


class ConversationStore:
    """The newest ``capacity`` conversations by id (least recently used dropped first); ``capacity`` 0 keeps none."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def create(self, items: list[dict[str, Any]], metadata: dict[str, Any] | None) -> Conversation:
        """A new conversation holding ``items`` (checked as for :meth:`add`)."""
        if self.capacity <= 0:
            raise APIError(400, "This server keeps no conversations (started with --stored-conversations 0); send "
                                "the whole conversation in each request's 'input' instead.")
        conversation = Conversation("conv_" + uuid.uuid4().hex, int(time.time()), check_metadata(metadata))
        conversation.items = with_ids(_checked(items))
        self._kept[conversation.id] = conversation
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)
        return conversation

    def get(self, conversation_id: str, param: str | None = None) -> Conversation:
        """The kept conversation; a 404 naming the id (and ``param``) when it is not (or no longer) kept."""
        found = self._kept.get(conversation_id)
        if found is None:
            raise APIError(404, f"Conversation with id {conversation_id!r} not found. This server keeps the last "
                                f"{self.capacity} conversations in memory, until it restarts (--stored-conversations).",
                           param, "not_found")
        self._kept.move_to_end(conversation_id)
        return found

    def add(self, conversation_id: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append ``items`` (at most 20 input items) to the conversation; returns them with their ids."""
        conversation = self.get(conversation_id)
        added = with_ids(_checked(items))
        conversation.items += added
        return added

    def extend(self, conversation_id: str, items: list[dict[str, Any]]) -> None:
        """Append a finished response's items (already with ids); nothing when the conversation was deleted."""
        found = self._kept.get(conversation_id)
        if found is not None:
            found.items += items

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The item ``item_id`` of a kept conversation, or None."""
        for conversation in reversed(self._kept.values()):
            for item in conversation.items:
                if item["id"] == item_id:
                    return item
        return None

    def delete(self, conversation_id: str) -> None:
        self.get(conversation_id)
        del self._kept[conversation_id]


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    """``metadata`` within OpenAI's limits (16 pairs, keys up to 64 characters, string values up to 512)."""
    metadata = metadata or {}
    if len(metadata) > MAX_METADATA:
        raise APIError(400, f"'metadata' has {len(metadata)} pairs; at most {MAX_METADATA} are allowed", "metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise APIError(400, f"'metadata' entry {key[:70]!r}: keys are strings of at most 64 characters, values "
                                "strings of at most 512", f"metadata.{key[:70]}")
    return dict(metadata)


def _checked(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``items`` if they are at most 20 input items the Responses API takes (messages, function calls and
    their outputs, in text: what its input translation accepts); a 400 naming the first bad one otherwise."""
    if len(items) > MAX_ADDED_ITEMS:
        raise APIError(400, f"{len(items)} items sent; add at most {MAX_ADDED_ITEMS} at a time", "items")
    if items:
        ResponsesRequest(model="", input=items).chat_request([(f"items.{k}", item) for k, item in enumerate(items)])
    return items
