"""Multi-turn chat: a model, its chat template, and a conversation memory.

Each turn asks the memory what to recall, lays that out as chat messages
(recalled turns as turns, summaries and facts in the system message), streams
the model's reply, and hands the finished exchange back to the memory.
Recalled turns are whole exchanges starting with a user message, so templates
that require strict user/assistant alternation accept every memory kind; a
template without a system role gets the system text in the first user message
(see :func:`~qlora.infer.template.render_chat`).
"""

from __future__ import annotations

from typing import Any, Iterator

from qlora.model.chat_format import ChatFormat

from .llm import ModelLLM
from .memory import ConversationBufferMemory
from .memory.base import BaseMemory
from .messages import Message


class Chat:
    """A conversation with a loaded model.

    Args:
        model: a transformers causal LM (4-bit/LoRA included).
        tokenizer: its tokenizer; its chat template formats the prompt (ChatML if none; ``qlora chat``
            passes the format ``--template auto`` picks).
        memory: what is remembered between turns; all turns by default.
        system: a system prompt put before everything else.
        chat_format: the format to prompt in (a fine-tune's saved one); default: the tokenizer's template.
        **gen_options: :class:`~qlora.infer.generate.SamplingOptions` fields.

    Example:
        >>> chat = Chat(model, tokenizer, memory=ConversationBufferWindowMemory(k=4, return_messages=True))
        >>> for piece in chat.send("Hello!"): print(piece, end="")
    """

    def __init__(self, model, tokenizer, memory: BaseMemory | None = None, system: str | None = None,
                 chat_format: ChatFormat | None = None, **gen_options: Any) -> None:
        self.llm = ModelLLM(model, tokenizer, chat_format=chat_format, **gen_options)
        self.memory = memory if memory is not None else ConversationBufferMemory(return_messages=True)
        self.system = system
        self.last_reply: str | None = None  # the reply of the last turn, once generated

    def prompt_messages(self, text: str) -> list[Message]:
        """The messages the model sees for the user's ``text``, memory included."""
        variables = dict(self.memory.load_memory_variables({"input": text}))
        history = variables.pop(self.memory.memory_key)
        context: list[str] = []
        turns: list[Message] = []
        if isinstance(history, str):
            if history:
                context.append(f"Relevant context from earlier in the conversation:\n{history}")
        else:
            context += [m.content for m in history if m.role == "system"]
            turns = [m for m in history if m.role != "system"]
        known = {name: summary for name, summary in variables.get("entities", {}).items() if summary}
        if known:
            context.append("What you know:\n" + "\n".join(f"- {name}: {summary}" for name, summary in known.items()))
        system = "\n\n".join(part for part in [self.system, *context] if part)
        return ([Message("system", system)] if system else []) + turns + [Message("user", text)]

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to ``text``; the memory records the exchange once the reply is complete.

        Raises:
            StoreLocked, StoreReadOnly: (a stored session) the exchange could not be saved;
                the reply was already streamed.
        """
        self.last_reply = None
        pieces = []
        for piece in self.llm.stream_messages(self.prompt_messages(text)):
            pieces.append(piece)
            yield piece
        self.last_reply = "".join(pieces).strip()
        self.memory.save_context({"input": text}, {"output": self.last_reply})
