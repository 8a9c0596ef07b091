"""The responses ``qlora serve`` keeps, so a client can continue one (``previous_response_id``),
read it back (``GET /v1/responses/{id}``), list its input items or delete it.

Kept in memory and bounded: the newest ``capacity`` responses stay, the least recently used
one is dropped first, and a restart forgets them all. A background response still queued or in
progress is never dropped (its client polls it, and its run updates it): it counts toward the
bound once finished, so the store holds at most ``capacity`` finished responses plus the
background ones still running, which the batcher's rows bound in practice. A kept response carries its whole
conversation as Responses items (the items of the responses it continued, its own input, its
output), so continuing it is that conversation followed by the new input, as on OpenAI's
platform. ``instructions`` are not part of it: each request gives its own.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from .protocol import APIError

DEFAULT_CAPACITY = 1000
RUNNING = ("queued", "in_progress")


@dataclass
class StoredResponse:
    """A kept ``response`` object (its latest state), the input items the model read for it, and for a
    background response its run (:class:`qlora.serve.background.BackgroundRun`: its task and stream events)."""

    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    run: Optional[Any] = None

    @property
    def running(self) -> bool:
        return self.response["status"] in RUNNING

    def current(self) -> dict[str, Any]:
        """The response as a read shows it now: a background one in progress with the message its run is
        streaming, as it stands (the run appends to it at each delta rather than keeping a new state)."""
        streaming = None if self.run is None else self.run.streaming
        if streaming is None or self.response["status"] != "in_progress":
            return self.response
        return self.response | {"output": [streaming.item()]}

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """What a continuation of this response reads before its own input: the input, then the output."""
        return [*self.input_items, *self.response["output"]]


class ResponseStore:
    """The newest ``capacity`` responses by id (least recently used dropped first); ``capacity`` 0 keeps none."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, response: dict[str, Any], input_items: list[dict[str, Any]], run: Any = None) -> None:
        """Keep ``response`` (or its new state: the same id), which the model wrote after reading ``input_items``."""
        if self.capacity <= 0:
            return
        kept = self._kept.get(response["id"])
        self._kept[response["id"]] = StoredResponse(response, input_items, run if kept is None else kept.run)
        self._kept.move_to_end(response["id"])
        if response["status"] in RUNNING:  # only finished ones count toward the bound
            return
        finished = [rid for rid, entry in self._kept.items() if not entry.running]
        for rid in finished[:max(0, len(finished) - self.capacity)]:  # the least recently used first
            del self._kept[rid]

    def get(self, response_id: str) -> StoredResponse:
        """The kept response; a 404 naming the id when it is not (or no longer) kept."""
        found = self._kept.get(response_id)
        if found is None:
            raise APIError(404, f"Response with id {response_id!r} not found. {self._why()}", code="not_found")
        self._kept.move_to_end(response_id)
        return found

    def previous(self, response_id: str) -> StoredResponse:
        """The response a request continues (``previous_response_id``); a 400 naming that field if unknown."""
        try:
            found = self.get(response_id)
        except APIError:
            raise APIError(400, f"Previous response with id {response_id!r} not found. {self._why()} Send the "
                                "whole conversation in 'input' instead.", "previous_response_id",
                           "previous_response_not_found") from None
        if found.running:
            raise APIError(400, f"Previous response with id {response_id!r} is still {found.response['status']} (a "
                                "background response); poll GET /v1/responses/{id} until it has finished, then "
                                "continue it.", "previous_response_id")
        return found

    def item(self, item_id: str) -> dict[str, Any] | None:
        """The item ``item_id`` of a kept response (an input item it read, or one of its output items), or None."""
        for entry in reversed(self._kept.values()):
            for item in (*entry.input_items, *entry.response["output"]):
                if item.get("id") == item_id:
                    return item
        return None

    def delete(self, response_id: str) -> None:
        """Forget a finished response (a running background one must be cancelled first: a 400)."""
        if self.get(response_id).running:
            raise APIError(400, f"Cannot delete an in-flight response: {response_id!r} is still running in the "
                                "background; cancel it (POST /v1/responses/{id}/cancel) or wait for it to finish.")
        del self._kept[response_id]

    def _why(self) -> str:
        if self.capacity <= 0:
            return "This server keeps no responses (started with --stored-responses 0)."
        return (f"This server keeps the last {self.capacity} stored responses in memory, until it restarts "
                "(--stored-responses); responses sent with 'store': false are not kept.")


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as the API lists them: messages with ``input_text`` parts (``output_text`` for the
    assistant's) and an ``id`` on each item that lacks one."""
    out = []
    for item in items:
        item = dict(item)
        if item.get("type", "message") == "message":
            item["type"] = "message"
            content = item.get("content")
            if isinstance(content, str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": content}]
            item.setdefault("status", "completed")
        prefix = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_",
                  "reasoning": "rs_"}.get(item["type"], "item_")
        item.setdefault("id", prefix + uuid.uuid4().hex)
        out.append(item)
    return out


def list_page(items: list[dict[str, Any]], order: str, limit: int, after: str | None) -> dict[str, Any]:
    """One page of ``items`` as OpenAI lists them (``order`` asc or desc, up to ``limit`` after the id
    ``after``), with ``first_id``, ``last_id`` and ``has_more``."""
    if order not in ("asc", "desc"):
        raise APIError(400, f"'order' must be 'asc' or 'desc', got {order!r}", "order")
    if not 1 <= limit <= 100:
        raise APIError(400, f"'limit' must lie between 1 and 100, got {limit}", "limit")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"'after' names no item of this list: {after!r}", "after")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}
