"""ConversationKGMemory: a knowledge graph of (subject, relation, object) triples."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..messages import Message, buffer_string
from .base import BaseMemory, exchanges, recent_exchanges
from .entity import parse_entities
from .prompts import ENTITY_EXTRACTION_PROMPT, KNOWLEDGE_TRIPLE_EXTRACTION_PROMPT
from .session import Triple

if TYPE_CHECKING:
    from ..llm import LLM

_PAREN = re.compile(r"\(([^()]*)\)")


def parse_triples(text: str) -> list[Triple]:
    """Every ``(subject, relation, object)`` in the model's answer, however it is separated.

    Groups with fewer than three parts are skipped. With more, the first part is
    the subject, the second the relation and the rest, commas kept, the object:
    ``(Acme, is based in, Nevada, USA)`` -> ``('Acme', 'is based in', 'Nevada, USA')``.
    Quotes and spaces around parts are stripped; duplicates removed.
    """
    triples: list[Triple] = []
    for group in _PAREN.findall(text):
        parts = [p.strip().strip("\"'`").strip() for p in group.split(",")]
        if len(parts) < 3 or not all(parts):
            continue
        triple = (parts[0], parts[1], ", ".join(parts[2:]))
        if triple not in triples:
            triples.append(triple)
    return triples


class ConversationKGMemory(BaseMemory):
    """Recalls what is known about the entities named in the current input.

    After each exchange the model extracts triples from the user's line; before
    the next, entities in the new input are looked up as triple subjects and
    recalled as ``"On Sam: Sam is a friend."`` system lines, as LangChain does.
    A new triple replaces a stored one with the same subject and object (``Ann
    lives in Paris`` then ``Ann moved away from Paris`` keeps only the second),
    as LangChain's graph overwrites an edge. No recent turns are shown verbatim.

    Args:
        llm: extracts entities and triples.
        k: exchanges of recent transcript given to the model as context for extraction.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, llm: LLM, k: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm = llm
        self.k = k

    def _history(self, upto: int | None = None) -> str:
        return buffer_string(recent_exchanges(self.session, self.k, upto), self.human_prefix, self.ai_prefix)

    def buffer(self) -> list[Message]:
        return []

    def entity_knowledge(self, entity: str) -> list[str]:
        """``"subject relation object"`` for each stored triple whose subject is ``entity``."""
        return [f"{s} {r} {o}" for s, r, o in self.session.triples() if s.lower() == entity.lower()]

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        prompt = ENTITY_EXTRACTION_PROMPT.format(history=self._history(), input=self.input_text(inputs))
        facts = []
        for entity in parse_entities(self.llm.complete(prompt)):
            knowledge = self.entity_knowledge(entity)
            if knowledge:
                facts.append(f"On {entity}: {'. '.join(knowledge)}.")
        if self.return_messages:
            return {self.memory_key: [Message("system", fact) for fact in facts]}
        return {self.memory_key: "\n".join(facts)}

    def catch_up(self) -> None:
        """Extract triples from each exchange after the cursor (history: the ``k`` exchanges up to it)."""
        for exchange in exchanges(self.session.entries(after=self.session.progress("triples"))):
            prompt = KNOWLEDGE_TRIPLE_EXTRACTION_PROMPT.format(history=self._history(exchange.through),
                                                               input=exchange.user.content)
            self.session.add_triples(parse_triples(self.llm.complete(prompt)), exchange.through)

    def contents(self) -> str:
        return "\n".join(f"({s}, {r}, {o})" for s, r, o in self.session.triples()) or "(no triples yet)"
