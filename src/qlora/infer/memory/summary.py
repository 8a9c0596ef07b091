"""ConversationSummaryMemory: a running summary the model writes as the chat goes on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..messages import Message, buffer_string
from .base import BaseMemory
from .prompts import SUMMARY_PROMPT

if TYPE_CHECKING:
    from ..llm import LLM


def predict_new_summary(llm: LLM, summary: str, messages: Sequence[Message], human_prefix: str = "Human",
                        ai_prefix: str = "AI") -> str:
    """Progressive summarization: extend ``summary`` with ``messages``, in the model's words."""
    new_lines = buffer_string(messages, human_prefix, ai_prefix)
    return llm.complete(SUMMARY_PROMPT.format(summary=summary, new_lines=new_lines)).strip()


class ConversationSummaryMemory(BaseMemory):
    """Shows the model a summary of the whole conversation instead of the turns.

    Costs one model call per exchange; keeps long conversations short. Exchanges
    saved but not yet summarized (the program was killed in between) are folded
    in at the next :meth:`catch_up`.

    Args:
        llm: writes the summary.
        **kwargs: see :class:`~qlora.infer.memory.base.BaseMemory`.
    """

    def __init__(self, llm: LLM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm = llm

    def catch_up(self) -> None:
        summary, covered = self.session.summary()
        pending = self.session.entries(after=covered)
        if pending:
            new = predict_new_summary(self.llm, summary, [m for _, m in pending], self.human_prefix, self.ai_prefix)
            self.session.set_summary(new, pending[-1][0])

    def load_memory_variables(self, inputs: dict[str, Any]) -> dict[str, Any]:
        summary = self.session.summary()[0]
        if self.return_messages:
            return {self.memory_key: [Message("system", summary)] if summary else []}
        return {self.memory_key: summary}

    def contents(self) -> str:
        return self.session.summary()[0] or "(no summary yet)"
