"""ConversationKGMemory: a knowledge graph of (subject, relation, object) triples."""

from __future__ import annotations

import re
from typing import Any

from ..llm import LLM
from ..messages import Message, buffer_string
from .base import BaseMemory
from .entity import parse_entities
from .prompts import ENTITY_EXTRACTION_PROMPT, KNOWLEDGE_TRIPLE_EXTRACTION_PROMPT
from .session import Triple

_PAREN = re.compile(r"\(([^()]*)\)")


def parse_triples(text: str) -> list[Triple]:
    """Every ``(subject, relation, object)`` in the model's answer, however it is separated.

    Groups with fewer than three parts are skipped; with more, the first part
    is the subject, the last the object and the middle ones the relation.
    Quotes and spaces around parts are stripped; duplicates removed.
    """
    triples: list[Triple] = []
    for group in _PAREN.findall(text):
        parts = [p.strip().strip("\"'`").strip() for p in group.split(",")]
        if len(parts) < 3 or not all(parts):
            continue
        triple = (parts[0], ", ".join(parts[1:-1]), parts[-1])
        if triple not in triples:
            triples.append(triple)
    return triples


class ConversationKGMemory(BaseMemory):
    """Recalls what is known about the entities named in the current input.

    After each exchange the model extracts triples from the user's line; before
    the next, entities in the new input are looked up as triple subjects.

    Args:
        llm: extracts entities and triples.
        k: exchanges of recent transcript given to the model as context.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, llm: LLM, k: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm = llm
        self.k = k

    def _recent(self) -> str:
        recent = self.session.messages()[-self.k * 2:] if self.k > 0 else []
        return buffer_string(recent, self.human_prefix, self.ai_prefix)

    def entity_knowledge(self, entity: str) -> list[str]:
        """``"relation object"`` for each stored triple whose subject is ``entity``."""
        return [f"{r} {o}" for s, r, o in self.session.triples() if s.lower() == entity.lower()]

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        prompt = ENTITY_EXTRACTION_PROMPT.format(history=self._recent(), input=self.input_text(inputs))
        facts = []
        for entity in parse_entities(self.llm.complete(prompt)):
            knowledge = self.entity_knowledge(entity)
            if knowledge:
                facts.append(f"On {entity}: {'. '.join(knowledge)}.")
        if self.return_messages:
            return {self.memory_key: [Message("system", fact) for fact in facts]}
        return {self.memory_key: "\n".join(facts)}

    def save_context(self, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        history = self._recent()
        super().save_context(inputs, outputs)
        prompt = KNOWLEDGE_TRIPLE_EXTRACTION_PROMPT.format(history=history, input=self.input_text(inputs))
        self.session.add_triples(parse_triples(self.llm.complete(prompt)))

    def contents(self) -> str:
        return "\n".join(f"({s}, {r}, {o})" for s, r, o in self.session.triples()) or "(no triples yet)"
