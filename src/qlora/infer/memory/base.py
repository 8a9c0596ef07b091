"""Behaviour every conversation memory shares (LangChain's ``BaseChatMemory``).

``save_context`` records a user turn and the reply (with the tool calls and
results in between, if any); ``load_memory_variables``
returns what the model should see before the next turn, under ``"history"``,
as one string by default or as :class:`~qlora.infer.messages.Message` objects
with ``return_messages=True``; ``clear`` forgets everything.

Recalled turns are always whole exchanges (tool calls and results included)
that start with a user message, so
chat templates that insist on user/assistant alternation (Llama-2, Mistral,
Gemma) accept them. Memories that derive state from exchanges (summaries,
entities, triples, vectors) do it in :meth:`BaseMemory.catch_up`, for every
exchange after their cursor in the session: the exchange is committed first,
what is derived from it after, and a crash in between is repaired by the next
``catch_up``: ``save_context`` calls it, and so should whoever resumes a stored
session (``qlora chat`` does, before the first turn).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from ..messages import Message, buffer_string
from .session import Entry, InMemorySession, Session


class Exchange(NamedTuple):
    """One whole exchange: the user's message, any tool calls and results, and the final reply."""

    messages: list[Message]
    user_id: int  # id of the user message
    through: int  # id of the reply, its last message

    @property
    def user(self) -> Message:
        return self.messages[0]

    @property
    def reply(self) -> Message:
        return self.messages[-1]


def _complete(turn: list[Message]) -> bool:
    """A user message followed by a final answer (an assistant message that calls no tool)."""
    return len(turn) > 1 and turn[-1].role == "assistant" and not turn[-1].tool_calls


def exchanges(entries: Iterable[Entry]) -> Iterator[Exchange]:
    """The complete exchanges in ``entries`` (oldest first): each user message with what follows it up to
    the next one, when that ends with a final answer; anything else skipped."""
    turn: list[Entry] = []
    for entry in [*entries, None]:
        if entry is None or entry[1].role == "user":
            messages = [m for _, m in turn]
            if _complete(messages):
                yield Exchange(messages, turn[0][0], turn[-1][0])
            turn = [entry] if entry is not None else []
        elif turn:
            turn.append(entry)


def recent_exchanges(session: Session, k: int, upto: int | None = None) -> list[Message]:
    """The messages of the last ``k`` whole exchanges (of those with ids up to ``upto``), tool calls and
    results included, oldest first; reads from the newest message back, no further than needed."""
    kept: list[Message] = []
    pending: list[Message] = []  # the exchange being read, newest message first
    found = 0
    if k <= 0:
        return kept
    for message_id, message in session.newest():
        if upto is not None and message_id > upto:
            continue
        pending.append(message)
        if message.role != "user":
            continue
        if _complete(pending[::-1]):
            kept += pending
            found += 1
            if found == k:
                break
        pending = []
    return kept[::-1]


class BaseMemory:
    """Shared plumbing: the session, the input/output keys and the history format.

    Args:
        session: where state lives; in process by default.
        return_messages: return history as messages instead of one string.
        human_prefix, ai_prefix: speaker names in the string form.
        input_key, output_key: which entry of ``inputs``/``outputs`` holds the
            text; by default the only entry, else ``"input"``/``"output"``.
    """

    memory_key = "history"

    def __init__(self, session: Session | None = None, return_messages: bool = False, human_prefix: str = "Human",
                 ai_prefix: str = "AI", input_key: str | None = None, output_key: str | None = None) -> None:
        self.session = session if session is not None else InMemorySession()
        self.return_messages = return_messages
        self.human_prefix = human_prefix
        self.ai_prefix = ai_prefix
        self.input_key = input_key
        self.output_key = output_key

    @staticmethod
    def _pick(values: dict[str, Any], key: str | None, default: str) -> str:
        if key is not None:
            return str(values[key])
        if len(values) == 1:
            return str(next(iter(values.values())))
        if default not in values:
            raise KeyError(f"cannot tell which of {sorted(values)} holds the text; pass {default}_key=")
        return str(values[default])

    def input_text(self, inputs: dict[str, Any]) -> str:
        """The user's text in ``inputs``."""
        return self._pick({k: v for k, v in inputs.items() if k != self.memory_key}, self.input_key, "input")

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any], steps: Sequence[Message] = (),
                     images: Sequence[Any] = ()) -> None:
        """Record one exchange (one transaction), then derive from it (see :meth:`catch_up`).

        ``steps``: the assistant's tool calls and the tool results between the user's message and the
        final reply, kept in order so the next turns see how the answer was reached.
        ``images``: the user message's images (kept with it; a stored session keeps their bytes).
        """
        user = Message("user", self.input_text(inputs), images=tuple(images))
        reply = Message("assistant", self._pick(outputs, self.output_key, "output"))
        self.session.add_messages([user, *steps, reply])
        self.catch_up()

    def catch_up(self) -> None:
        """Derive state from every exchange after this memory's cursor in the session (each
        exchange in its own transaction); nothing to do for memories that show turns verbatim."""

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What the model should see before answering ``inputs``."""
        return {self.memory_key: self.format(self.buffer())}

    def buffer(self) -> list[Message]:
        """The messages this memory shows verbatim (all of them here)."""
        return self.session.messages()

    def format(self, messages: Sequence[Message]) -> str | list[Message]:
        """``messages`` as the configured history form."""
        if self.return_messages:
            return list(messages)
        return buffer_string(messages, self.human_prefix, self.ai_prefix)

    def contents(self) -> str:
        """A human-readable view of what the memory holds (``/memory`` in ``qlora chat``)."""
        return buffer_string(self.buffer(), self.human_prefix, self.ai_prefix) or "(empty)"

    def clear(self) -> None:
        """Forget the whole conversation."""
        self.session.clear()
