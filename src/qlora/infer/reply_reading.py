"""How a chat reply's decoded text is read: gpt-oss's harmony channels, a reasoning block, tool calls.

One place decides, for ``qlora generate``, ``qlora chat`` (:class:`~qlora.infer.llm.ModelLLM`) and ``qlora serve``,
which markup tokens decoding keeps and what splits the reply into the answer a user reads, its reasoning and its
calls: :class:`~qlora.infer.harmony.HarmonyStream` for a harmony template, else
:class:`~qlora.infer.reasoning_reply.ReasoningStream` where the template has reasoning markup (chained to the
tool-call splitter), else the tool-call splitter alone (or nothing).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

from qlora.model.chat_format import ChatFormat

from .harmony import HarmonyStream, is_harmony
from .harmony import markup_token_ids as harmony_token_ids
from .reasoning_reply import ReasoningMarkups, ReasoningStream
from .reasoning_reply import markup_token_ids as reasoning_token_ids
from .tool_calls import ToolCall, ToolCallStream

Splitter = HarmonyStream | ReasoningStream | ToolCallStream


class ReplyReader:
    """The reading of one tokenizer's chat replies; each template's reasoning markup is found once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.markups = ReasoningMarkups(tokenizer)

    def keep(self, template: str | None, chat_format: ChatFormat | None = None,
             template_kwargs: dict[str, Any] | None = None) -> frozenset[int]:
        """The special tokens decoding keeps for the splitter to read (harmony's, or the reasoning markup's)."""
        if is_harmony(self.tokenizer, template):
            return harmony_token_ids(self.tokenizer)
        markup = self.markups(chat_format, template_kwargs, template)
        return reasoning_token_ids(self.tokenizer, markup) if markup is not None else frozenset()

    def reads(self, template: str | None, chat_format: ChatFormat | None = None,
              template_kwargs: dict[str, Any] | None = None) -> bool:
        """Whether replies in ``template`` hold more than their answer: harmony's channels, or reasoning markup."""
        return is_harmony(self.tokenizer, template) or self.markups(chat_format, template_kwargs, template) is not None

    def splitter(self, prompt: str, template: str | None, chat_format: ChatFormat | None = None,
                 template_kwargs: dict[str, Any] | None = None, tools: ToolCallStream | None = None,
                 tool_names: Sequence[str] | None = None) -> Splitter | None:
        """What splits the reply to ``prompt`` (rendered by ``template``, the format's or the tokenizer's):
        ``tools`` splits the answer's calls; ``tool_names``, the offered tools (None: none), serve harmony's."""
        if is_harmony(self.tokenizer, template):
            return HarmonyStream(tool_names)
        markup = self.markups(chat_format, template_kwargs, template)
        if markup is None:
            return tools
        dropped = [self.tokenizer.decode([i], skip_special_tokens=False)
                   for i in sorted(reasoning_token_ids(self.tokenizer, markup))]
        return ReasoningStream(markup, prompt, tools, dropped)


class ReplyText:
    """The answer of a reply's decoded ``pieces`` as a user reads it, piece by piece: ``split`` (a
    :meth:`ReplyReader.splitter`; None: the text is the answer) reads its reasoning and calls apart. Iterate it once;
    ``on_reasoning`` receives the reasoning as it settles, and :attr:`calls` and :attr:`reasoning` hold the rest once
    the iteration ends."""

    def __init__(self, pieces: Iterable[str], split: Splitter | None,
                 on_reasoning: Callable[[str], None] | None = None) -> None:
        self.pieces, self.split, self.on_reasoning = pieces, split, on_reasoning
        self.calls: list[ToolCall] = []

    def __iter__(self) -> Iterator[str]:
        if self.split is None:
            yield from self.pieces
            return
        for piece in self.pieces:
            shown = self.split.push(piece)
            self._pass_reasoning()
            if shown:
                yield shown
        tail, self.calls = self.split.finish()
        self._pass_reasoning()
        if tail:
            yield tail

    @property
    def reasoning(self) -> str:
        """The reply's reasoning, apart from its answer ('' when it has none)."""
        return getattr(self.split, "reasoning", "")

    def _pass_reasoning(self) -> None:
        if self.on_reasoning is not None and hasattr(self.split, "take_reasoning"):
            if thought := self.split.take_reasoning():
                self.on_reasoning(thought)
