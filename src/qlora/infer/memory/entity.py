"""ConversationEntityMemory: what the conversation said about each person, place and thing."""

from __future__ import annotations

import re
from typing import Any

from ..llm import LLM
from ..messages import buffer_string
from .base import BaseMemory
from .prompts import ENTITY_EXTRACTION_PROMPT, ENTITY_SUMMARIZATION_PROMPT

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
    each one's description is updated from that exchange.

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

    def buffer(self):
        return self.session.messages()[-self.k * 2:] if self.k > 0 else []

    def _recent(self) -> str:
        return buffer_string(self.buffer(), self.human_prefix, self.ai_prefix)

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        prompt = ENTITY_EXTRACTION_PROMPT.format(history=self._recent(), input=self.input_text(inputs))
        self.entity_cache = parse_entities(self.llm.complete(prompt))
        known = self.session.entities()
        return {self.memory_key: self.format(self.buffer()),
                "entities": {name: known.get(name, "") for name in self.entity_cache}}

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        super().save_context(inputs, outputs)
        text, history, known = self.input_text(inputs), self._recent(), self.session.entities()
        updates = {}
        for name in self.entity_cache:
            prompt = ENTITY_SUMMARIZATION_PROMPT.format(
                history=history, entity=name, summary=known.get(name, ""), input=text)
            updates[name] = self.llm.complete(prompt).strip()
        self.session.set_entities(updates)

    def contents(self) -> str:
        entities = self.session.entities()
        return "\n".join(f"{name}: {summary}" for name, summary in entities.items()) or "(no entities yet)"

    def clear(self) -> None:
        super().clear()
        self.entity_cache = []
