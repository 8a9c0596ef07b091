"""What a memory remembers, kept in process or (see ``qlora.infer.store``) in SQLite.

A memory object holds only its settings; all conversation state goes through a
:class:`Session`, so the same memory class works in memory for a script and on
disk for ``qlora chat --session``. The full transcript is always kept (for
``/history``); each memory decides which part of it to show the model.
"""

from __future__ import annotations

from typing import Protocol, Sequence

from ..messages import Message

Triple = tuple[str, str, str]


class Session(Protocol):
    """Storage of one conversation: messages, a running summary, entities, triples, vectors."""

    def messages(self) -> list[Message]: ...
    def add_messages(self, messages: Sequence[Message]) -> None: ...
    def summary(self) -> tuple[str, int]: ...
    def set_summary(self, text: str, covered: int) -> None: ...
    def entities(self) -> dict[str, str]: ...
    def set_entities(self, entities: dict[str, str]) -> None: ...
    def triples(self) -> list[Triple]: ...
    def add_triples(self, triples: Sequence[Triple]) -> None: ...
    def vectors(self) -> list[tuple[str, list[float]]]: ...
    def add_vector(self, text: str, embedding: Sequence[float]) -> None: ...
    def clear(self) -> None: ...


class InMemorySession:
    """A :class:`Session` that lives as long as the process."""

    def __init__(self) -> None:
        self.clear()

    def messages(self) -> list[Message]:
        return list(self._messages)

    def add_messages(self, messages: Sequence[Message]) -> None:
        self._messages.extend(messages)

    def summary(self) -> tuple[str, int]:
        """The running summary and how many leading messages it covers."""
        return self._summary

    def set_summary(self, text: str, covered: int) -> None:
        self._summary = (text, covered)

    def entities(self) -> dict[str, str]:
        return dict(self._entities)

    def set_entities(self, entities: dict[str, str]) -> None:
        self._entities.update(entities)

    def triples(self) -> list[Triple]:
        return list(self._triples)

    def add_triples(self, triples: Sequence[Triple]) -> None:
        self._triples.extend(t for t in dict.fromkeys(triples) if t not in self._triples)

    def vectors(self) -> list[tuple[str, list[float]]]:
        return list(self._vectors)

    def add_vector(self, text: str, embedding: Sequence[float]) -> None:
        self._vectors.append((text, list(embedding)))

    def clear(self) -> None:
        self._messages: list[Message] = []
        self._summary: tuple[str, int] = ("", 0)
        self._entities: dict[str, str] = {}
        self._triples: list[Triple] = []
        self._vectors: list[tuple[str, list[float]]] = []
