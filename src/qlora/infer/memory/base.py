"""Behaviour every conversation memory shares (LangChain's ``BaseChatMemory``).

``save_context`` records a user turn and the reply; ``load_memory_variables``
returns what the model should see before the next turn, under ``"history"``,
as one string by default or as :class:`~qlora.infer.messages.Message` objects
with ``return_messages=True``; ``clear`` forgets everything.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..messages import Message, buffer_string
from .session import InMemorySession, Session


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

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Record one exchange: the user's input and the model's output."""
        user = Message("user", self.input_text(inputs))
        self.session.add_messages([user, Message("assistant", self._pick(outputs, self.output_key, "output"))])

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
