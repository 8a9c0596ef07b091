"""What a memory remembers, kept in process or (see ``qlora.infer.store``) in SQLite.

A memory object holds only its settings; all conversation state goes through a
:class:`Session`, so the same memory class works in memory for a script and on
disk for ``qlora chat --session``. The full transcript is always kept (for
``/history``); each memory decides which part of it to show the model.

Messages carry increasing ids. What a memory derives from them (a summary, entity
descriptions, triples, vectors) is written with ``through``, the id of the last
message it accounts for, in the same transaction as the derived data; a write for
messages already accounted for is skipped. So after a crash between saving an
exchange and deriving from it, the memory finds the exchanges after its cursor
and catches up, and no exchange is derived from twice.
"""

from __future__ import annotations

from array import array
from typing import Iterator, Protocol, Sequence

from ..messages import Message

Triple = tuple[str, str, str]
Entry = tuple[int, Message]  # (message id, message)

# Cursor names of :meth:`Session.progress`.
DERIVED = ("summary", "entities", "triples", "vectors")


class Session(Protocol):
    """Storage of one conversation: messages, a running summary, entities, triples, vectors."""

    def messages(self) -> list[Message]: ...
    def entries(self, after: int = 0) -> list[Entry]: ...
    def newest(self) -> Iterator[Entry]: ...
    def add_messages(self, messages: Sequence[Message]) -> int: ...
    def progress(self, kind: str) -> int: ...
    def summary(self) -> tuple[str, int]: ...
    def set_summary(self, text: str, through: int) -> bool: ...
    def entities(self) -> dict[str, str]: ...
    def set_entities(self, entities: dict[str, str], through: int) -> bool: ...
    def triples(self) -> list[Triple]: ...
    def add_triples(self, triples: Sequence[Triple], through: int) -> bool: ...
    def vectors(self, after: int = 0) -> list[tuple[int, str, bytes]]: ...
    def add_vector(self, text: str, embedding: Sequence[float], through: int, embedder: str) -> bool: ...
    def embedder(self) -> tuple[str, int] | None: ...
    def clear(self) -> None: ...


def replace_triples(known: list[Triple], new: Sequence[Triple]) -> list[Triple]:
    """``known`` with ``new`` added; a new triple replaces any with the same subject and
    object (case-insensitive), as an edge of LangChain's graph is overwritten."""
    result = list(known)
    for triple in dict.fromkeys(new):
        key = (triple[0].lower(), triple[2].lower())
        result = [t for t in result if (t[0].lower(), t[2].lower()) != key]
        result.append(triple)
    return result


class InMemorySession:
    """A :class:`Session` that lives as long as the process."""

    def __init__(self) -> None:
        self._next_id = 1
        self.clear()

    def messages(self) -> list[Message]:
        return [m for _, m in self._messages]

    def entries(self, after: int = 0) -> list[Entry]:
        """``(id, message)`` of the messages after id ``after``, oldest first."""
        return [e for e in self._messages if e[0] > after]

    def newest(self) -> Iterator[Entry]:
        """``(id, message)`` from the newest message back; stop whenever enough were read."""
        return reversed(self._messages)

    def add_messages(self, messages: Sequence[Message]) -> int:
        """Append ``messages``; the id of the last one."""
        for m in messages:
            self._messages.append((self._next_id, m))
            self._next_id += 1
        return self._next_id - 1

    def progress(self, kind: str) -> int:
        """Id of the last message that derived state ``kind`` (one of ``DERIVED``) accounts for."""
        return self._progress.get(kind, 0)

    def _advance(self, kind: str, through: int) -> bool:
        if through <= self.progress(kind):
            return False
        self._progress[kind] = through
        return True

    def summary(self) -> tuple[str, int]:
        """The running summary and the id of the last message it covers."""
        return self._summary, self.progress("summary")

    def set_summary(self, text: str, through: int) -> bool:
        if not self._advance("summary", through):
            return False
        self._summary = text
        return True

    def entities(self) -> dict[str, str]:
        return dict(self._entities)

    def set_entities(self, entities: dict[str, str], through: int) -> bool:
        if not self._advance("entities", through):
            return False
        self._entities.update(entities)
        return True

    def triples(self) -> list[Triple]:
        return list(self._triples)

    def add_triples(self, triples: Sequence[Triple], through: int) -> bool:
        if not self._advance("triples", through):
            return False
        self._triples = replace_triples(self._triples, triples)
        return True

    def vectors(self, after: int = 0) -> list[tuple[int, str, bytes]]:
        """``(id, text, embedding as float32 bytes)`` of the documents after id ``after``, oldest first."""
        return [v for v in self._vectors if v[0] > after]

    def add_vector(self, text: str, embedding: Sequence[float], through: int, embedder: str) -> bool:
        if not self._advance("vectors", through):
            return False
        self._embedder = self._embedder or (embedder, len(embedding))
        self._vectors.append((self._next_id, text, array("f", embedding).tobytes()))
        self._next_id += 1
        return True

    def embedder(self) -> tuple[str, int] | None:
        """Name and width of the embedder the stored vectors came from (None before the first)."""
        return self._embedder

    def clear(self) -> None:
        self._messages: list[Entry] = []
        self._summary = ""
        self._progress: dict[str, int] = {}
        self._entities: dict[str, str] = {}
        self._triples: list[Triple] = []
        self._vectors: list[tuple[int, str, bytes]] = []
        self._embedder: tuple[str, int] | None = None
