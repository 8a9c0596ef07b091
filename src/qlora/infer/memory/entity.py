"""ConversationEntityMemory: what the conversation said about each person, place and thing."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..messages import Message, buffer_string
from .base import BaseMemory, exchanges, recent_exchanges
from .prompts import ENTITY_EXTRACTION_PROMPT, ENTITY_SUMMARIZATION_PROMPT

if TYPE_CHECKING:
    from ..llm import LLM

_MAX_ENTITY_CHARS = 60


def parse_entities(text: str) -> list[str]:
    """Entity names from the model's comma-separated answer; ``NONE`` -> none.

    Small models ramble, so only the first non-empty line counts, list markers
    and quotes are stripped, duplicates and over-long items dropped.
    """
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*output\s*:", "", line, flags=re.IGNORECASE)
    names: list[str] = []
    for item in line.split(","):
        name = item.strip().strip("-*•\"'`.[]").strip()
        if name and name.upper() != "NONE" and len(name) <= _MAX_ENTITY_CHARS and name not in names:
            names.append(name)
    return names


class ConversationEntityMemory(BaseMemory):
    """Recalls short, model-written descriptions of the entities in the current input.

    Before a turn the model lists the entities in the user's input; after it,
    each one's description is updated from that exchange. An exchange whose
    descriptions were not written (the program was killed first) is caught up
    later: its entities are extracted again and described then.

    Args:
        llm: extracts entities and writes their descriptions.
        k: exchanges of recent transcript shown (and used as context for the model).
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, llm: LLM, k: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm = llm
        self.k = k
        self.entity_cache: list[str] = []
        self._cached_input: str | None = None

    def buffer(self) -> list[Message]:
        return recent_exchanges(self.session, self.k)

    def _history(self, upto: int | None = None) -> str:
        return buffer_string(recent_exchanges(self.session, self.k, upto), self.human_prefix, self.ai_prefix)

    def _extract(self, text: str, upto: int | None = None) -> list[str]:
        prompt = ENTITY_EXTRACTION_PROMPT.format(history=self._history(upto), input=text)
        return parse_entities(self.llm.complete(prompt))

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        text = self.input_text(inputs)
        self.entity_cache, self._cached_input = self._extract(text), text
        known = self.session.entities()
        return {self.memory_key: self.format(self.buffer()),
                "entities": {name: known.get(name, "") for name in self.entity_cache}}

    def catch_up(self) -> None:
        for exchange in exchanges(self.session.entries(after=self.session.progress("entities"))):
            user, through = exchange.user, exchange.through
            names = self.entity_cache if user.content == self._cached_input else \
                self._extract(user.content, exchange.user_id - 1)
            history, known = self._history(through), self.session.entities()
            updates = {}
            for name in names:
                prompt = ENTITY_SUMMARIZATION_PROMPT.format(
                    history=history, entity=name, summary=known.get(name, ""), input=user.content)
                updates[name] = self.llm.complete(prompt).strip()
            self.session.set_entities(updates, through)
            if user.content == self._cached_input:
                self._cached_input = None

    def contents(self) -> str:
        entities = self.session.entities()
        return "\n".join(f"{name}: {summary}" for name, summary in entities.items()) or "(no entities yet)"

    def clear(self) -> None:
        super().clear()
        self.entity_cache, self._cached_input = [], None
