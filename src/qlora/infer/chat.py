"""Multi-turn chat: a model, its chat template, and a conversation memory.

Each turn asks the memory what to recall, lays that out as chat messages
(recalled turns as turns, summaries and facts in the system message), streams
the model's reply, and hands the finished exchange back to the memory.
Recalled turns are whole exchanges starting with a user message, so templates
that require strict user/assistant alternation accept every memory kind; a
template without a system role gets the system text in the first user message
(see :func:`~qlora.infer.template.render_chat`).

With tools, a reply that calls them ends with :attr:`Chat.pending_calls` set; the
caller runs them and hands the results to :meth:`Chat.send_tool_results`, and the
model goes on from there. Once it answers, the memory records the user's text, the
assistant's calls and the tool results, and the final answer, so later turns (and a
resumed stored session) see how earlier answers were reached.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence

from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat

from .llm import ModelLLM
from .memory import ConversationBufferMemory
from .memory.base import BaseMemory
from .messages import Message
from .reply_reading import ReplyText
from .tool_calls import ToolCall


class Chat:
    """A conversation with a loaded model.

    Args:
        model: a transformers causal LM (4-bit/LoRA included).
        tokenizer: its tokenizer; its chat template formats the prompt (ChatML if none; ``qlora chat``
            passes the format ``--template auto`` picks).
        memory: what is remembered between turns; all turns by default.
        system: a system prompt put before everything else.
        chat_format: the format to prompt in (a fine-tune's saved one); default: the tokenizer's template.
        tools: OpenAI function definitions shown to the model; its calls are parsed out of its replies.
        template_kwargs: variables the chat template is rendered with (``{"enable_thinking": False}``), over the
            format's own.
        on_reasoning: called with each piece of a reply's reasoning as it settles (``qlora chat`` shows it apart
            from the answer, so a reasoning model is not silent while it thinks); the answer alone is yielded.
        **gen_options: :class:`~qlora.infer.generate.SamplingOptions` fields.

    Example:
        >>> chat = Chat(model, tokenizer, memory=ConversationBufferWindowMemory(k=4, return_messages=True))
        >>> for piece in chat.send("Hello!"): print(piece, end="")
    """

    def __init__(self, model, tokenizer, memory: BaseMemory | None = None, system: str | None = None,
                 chat_format: ChatFormat | None = None, tools: Sequence[dict] | None = None,
                 template_kwargs: dict[str, Any] | None = None, on_reasoning: Callable[[str], None] | None = None,
                 **gen_options: Any) -> None:
        self.on_reasoning = on_reasoning
        self.llm = ModelLLM(model, tokenizer, chat_format=chat_format, template_kwargs=template_kwargs,
                            **gen_options)
        self.memory = memory if memory is not None else ConversationBufferMemory(return_messages=True)
        self.system = system
        self.tools = list(tools) if tools else None
        self.tool_format = self.llm.tool_format() if self.tools else None  # raises if the template shows no tools
        self.last_reply: str | None = None  # the reply of the last turn, once generated (its answer)
        self.last_reasoning = ""  # the reasoning the last reply wrote before its answer or calls (not shown)
        self.pending_calls: list[tuple[str, ToolCall]] = []  # (id, call) the last reply made, awaiting results
        self._turn: list[Message] = []  # the current turn's prompt: memory, user text, calls and results so far
        self._steps: list[Message] = []  # the current turn's calls and results, for the memory
        self._input = ""
        self._images: tuple[Any, ...] = ()  # the current turn's user images
        self._said = ""  # text of the last reply before its calls

    def prompt_messages(self, text: str, images: Sequence[Any] = ()) -> list[Message]:
        """The messages the model sees for the user's ``text`` (with ``images``: ImageRefs, for a
        vision-language model given ``self.llm.processor``), memory included."""
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
        return ([Message("system", system)] if system else []) + turns + [Message("user", text, images=tuple(images))]

    def send(self, text: str, images: Sequence[Any] = ()) -> Iterator[str]:
        """Stream the reply to ``text`` (and ``images``, see :meth:`prompt_messages`); the memory records the
        exchange once the reply is complete (with tools: once a reply calls no more tools).

        Raises:
            StoreLocked, StoreReadOnly: (a stored session) the exchange could not be saved;
                the reply was already streamed.
        """
        self._input, self._turn, self._steps = text, self.prompt_messages(text, images), []
        self._images = tuple(images)
        yield from self._reply()

    def send_tool_results(self, results: Sequence[str]) -> Iterator[str]:
        """Stream the model's reply once each of :attr:`pending_calls` has its result (in that order)."""
        if len(results) != len(self.pending_calls):
            raise UsageError(f"{len(self.pending_calls)} tool calls are waiting for results, got {len(results)}")
        calls = tuple({"id": call_id, "type": "function",
                       "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                      for call_id, call in self.pending_calls)
        results_given = [Message("tool", result, tool_call_id=call_id)
                         for (call_id, _), result in zip(self.pending_calls, results)]
        # the prompt goes on after the reasoning that led to the calls, as the template writes it within a turn
        # (gpt-oss's analysis, Qwen3's <think> block); the memory keeps the calls, whose reasoning later turns drop
        self._turn += [Message("assistant", self._said, calls, reasoning=self.last_reasoning), *results_given]
        self._steps += [Message("assistant", self._said, calls), *results_given]
        return self._reply()

    def _reply(self) -> Iterator[str]:
        self.last_reply, self.pending_calls, self._said, self.last_reasoning = None, [], "", ""
        reply = ReplyText(*self.llm.reply(self._turn, tools=self.tools), on_reasoning=self.on_reasoning)
        pieces = []
        for shown in reply:
            pieces.append(shown)
            yield shown
        calls, self.last_reasoning = reply.calls, reply.reasoning
        if calls:
            self._said = "".join(pieces).strip()
            self.pending_calls = [(self.tool_format.new_id(), call) for call in calls]
            return
        self.last_reply = "".join(pieces).strip()
        self.memory.save_context({"input": self._input}, {"output": self.last_reply}, steps=self._steps,
                                 images=self._images)
