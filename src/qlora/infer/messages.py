"""Chat messages and the plain-text transcript form that memory prompts use.

A message is a role (``system``, ``user``, ``assistant``) and its text. LangChain
prompts show a conversation as ``Human: ...`` / ``AI: ...`` lines; the same
rendering is used here so its prompts work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: who spoke and what they said."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; choose from {', '.join(ROLES)}")


def buffer_string(messages: Iterable[Message], human_prefix: str = "Human", ai_prefix: str = "AI") -> str:
    """The transcript as ``Human: ...``/``AI: ...`` lines (LangChain's ``get_buffer_string``)."""
    prefix = {"user": human_prefix, "assistant": ai_prefix, "system": "System"}
    return "\n".join(f"{prefix[m.role]}: {m.content}" for m in messages)
