"""A reply's reasoning read apart from its answer, by the markup its chat template wraps reasoning in.

Reasoning models write their chain of thought before the answer, inside markup their template defines: Qwen3's
``<think>\\n...\\n</think>\\n\\n``, Mistral's ``[THINK]...[/THINK]``, Command A's ``<|START_THINKING|>...``, Gemma 4's
``<|channel>thought\\n...<channel|>``, or only the closing ``</think>`` when the generation prompt opens the block
itself (DeepSeek-R1, QwQ, Qwen3.5 thinking). Where that markup is special tokens, a plain decode drops it and runs the
reasoning into the answer (``Two and two.Four.``), which a conversation's memory then keeps as the answer; where it
is text, the reply shows template markup. The markup is not guessed from model names: it is what training teaches
the model to write after the generation prompt (:func:`~qlora.chat.tokenize.tokenize_example` on an answer with
reasoning, which the template places its own way), read around the reasoning and the answer. The reply's text is
then its answer, and the reasoning is kept apart, as vLLM's reasoning parsers split them: a reply that opens no
block (and follows a prompt that opened none) is all answer; a block that never closes (cut by the token limit), the
model's or the prompt's, is all reasoning (vLLM's DeepSeek-R1 parser, which QwQ's also uses). The reasoning streams as
it is written, the prompt's block too, so a reasoning model is not silent until its block closes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from qlora.model.chat_format import ChatFormat

from .text_stream import held_suffix
from .tool_calls import ToolCall, ToolCallStream

_REASONING, _ANSWER = "qlora reasoning probe", "qlora answer probe"
_USER = {"role": "user", "content": "Hello"}


@dataclass(frozen=True)
class ReasoningMarkup:
    """The tags around a reply's reasoning (stripped of the space around them): ``opening`` begins the block (written
    by the model, or ending the generation prompt), ``closing`` ends it before the answer."""

    opening: str
    closing: str


def reasoning_markup(tokenizer, chat_format: ChatFormat) -> ReasoningMarkup | None:
    """The markup training puts around an answer's reasoning in ``chat_format``, or None when the template has no
    place for reasoning (or no markup tells it from the answer)."""
    from qlora.chat.example import Example
    from qlora.chat.tokenize import IGNORE_INDEX, tokenize_example
    from qlora.errors import UsageError

    answer = {"role": "assistant", "content": _ANSWER, "reasoning_content": _REASONING}
    try:
        tokenized = tokenize_example(Example((_USER, answer), None, "the reasoning probe"), tokenizer, chat_format)
        prompt = chat_format.render(tokenizer, [_USER], add_generation_prompt=True)
    except UsageError:  # no place for reasoning
        return None
    except Exception:  # noqa: BLE001 - a template that cannot render the probe: the prompt's own rendering reports it
        return None
    text = tokenizer.decode(tokenized.input_ids, skip_special_tokens=False)
    if not text.startswith(prompt):  # trained in another mode (Gemma 4's thinking): from where training starts
        first = next((i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX), 0)
        prompt = tokenizer.decode(tokenized.input_ids[:first], skip_special_tokens=False)
    start = len(prompt)
    at, answer_at = text.find(_REASONING, start), text.find(_ANSWER, start)
    if at < 0 or answer_at < at + len(_REASONING):
        return None
    opening, closing = text[start:at].strip(), text[at + len(_REASONING):answer_at].strip()
    if not opening:  # the generation prompt of the mode reasoning trains in opens the block: its tag ends the prompt
        opening = closing.replace("/", "", 1)
        prompt = tokenizer.decode(tokenized.input_ids, skip_special_tokens=False)[:at].rstrip()
        if not opening or not prompt.endswith(opening):
            return None
    return ReasoningMarkup(opening, closing) if closing and opening != closing else None


class ReasoningMarkups:
    """:func:`reasoning_markup` of each template and its variables, found once (the probe tokenizes a row)."""

    def __init__(self, tokenizer, size: int = 64) -> None:
        self.tokenizer, self.size = tokenizer, size
        self._known: OrderedDict[str, ReasoningMarkup | None] = OrderedDict()

    def __call__(self, chat_format: ChatFormat | None, template_kwargs: dict[str, Any] | None = None,
                 template: str | None = None) -> ReasoningMarkup | None:
        """The markup of ``chat_format`` (else of ``template``: the tokenizer's own) rendered with
        ``template_kwargs`` over the format's own."""
        template = chat_format.template if chat_format is not None else template
        if not template:
            return None
        kwargs = {**(chat_format.template_kwargs if chat_format is not None else {}), **(template_kwargs or {})}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("add_generation_prompt", "continue_final_message")}
        date = chat_format.date if chat_format is not None else ""
        key = repr((template, date, sorted(kwargs.items(), key=str)))
        if key not in self._known:
            fmt = ChatFormat(template, chat_format.origin if chat_format is not None else "the chat template",
                             date=date, template_kwargs=kwargs)
            self._known[key] = reasoning_markup(self.tokenizer, fmt)
            while len(self._known) > self.size:
                self._known.popitem(last=False)
        return self._known[key]


def markup_token_ids(tokenizer, markup: ReasoningMarkup) -> frozenset[int]:
    """Ids of the special tokens of the markup: decoding keeps them for :class:`ReasoningStream` to see it."""
    specials = set(tokenizer.all_special_ids)
    ids = tokenizer(markup.opening + markup.closing, add_special_tokens=False).input_ids
    return frozenset(i for i in ids if i in specials)


class ReasoningStream:
    """Split a streamed reply into its answer (released as it comes) and its reasoning, and with ``then`` (a tool-call
    splitter) the answer into content and calls. Same use as :class:`~qlora.infer.tool_calls.ToolCallStream`.

    ``prompt``: the rendered prompt; one that ends with the opening tag puts the reply's start in the block.
    ``dropped``: the text of the markup's special tokens (:func:`markup_token_ids`), which the answer leaves out.
    """

    def __init__(self, markup: ReasoningMarkup, prompt: str = "", then: ToolCallStream | None = None,
                 dropped: Sequence[str] = ()) -> None:
        self.markup, self.then = markup, then
        self.dropped = tuple(dropped)  # the markup's special tokens (kept by decoding, for this split to see them)
        self.text = ""
        # where the reasoning starts: at once after a prompt that opened the block
        self.body_at: int | None = 0 if prompt.rstrip().endswith(markup.opening) else None
        self.answer_at: int | None = None  # where the answer starts, once the block is closed (or none opened)
        self.forwarded = 0  # characters of the answer passed on
        self.taken = 0  # characters of the reasoning taken (:meth:`take_reasoning`)
        self.finished = False  # the reply ended (:meth:`finish`): a closing tag's first characters are reasoning

    def push(self, piece: str) -> str:
        """Add decoded text; return the answer text that is safe to show."""
        self.text += piece
        if self.answer_at is None and self.body_at is None:
            start = self.text.lstrip()
            if self.markup.opening.startswith(start):
                return ""  # too short to tell
            if not start.startswith(self.markup.opening):
                self.answer_at = 0
            else:
                self.body_at = self.text.find(self.markup.opening) + len(self.markup.opening)
        if self.answer_at is None:
            end = self.text.find(self.markup.closing, self.body_at)
            if end < 0:
                return ""
            self.answer_at = end + len(self.markup.closing)
        return self._forward()

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The answer not shown yet, and its calls. A block never closed is all reasoning (cut by the token limit),
        whether the model or the prompt opened it, as vLLM reads it; a reply too short to tell is the answer."""
        self.finished = True
        if self.answer_at is None and self.body_at is None:
            self.answer_at = 0
        shown = self._forward() if self.answer_at is not None else ""
        if self.then is None:
            return shown, []
        tail, calls = self.then.finish()
        return shown + tail, calls

    @property
    def reasoning(self) -> str:
        """The reasoning written so far, without its markup and the space around it."""
        if self.body_at is None:
            return ""
        end = self.answer_at - len(self.markup.closing) if self.answer_at is not None else len(self.text)
        body = self.text[self.body_at:end].strip()
        return body.removeprefix(self.markup.opening).lstrip()  # the tag again after a prompt that wrote it

    def take_reasoning(self) -> str:
        """The reasoning written since the last call, as far as later text cannot change it (the start of a closing
        tag is held back until the tag is whole or the reply ends)."""
        if self.answer_at is not None or self.finished:
            done = self.reasoning
        elif self.body_at is None:
            done = ""
        else:
            body = self.text[self.body_at:]
            body = body[:len(body) - held_suffix(body, [self.markup.closing])].strip()
            done = "" if self.markup.opening.startswith(body) else body.removeprefix(self.markup.opening).lstrip()
        new, self.taken = done[self.taken:], max(self.taken, len(done))
        return new

    def _forward(self) -> str:
        answer = self.text[self.answer_at:]
        if self.answer_at:  # after the block: not the space the closing tag is followed by
            answer = answer.lstrip()
        for token in self.dropped:  # written where it marks nothing: left out, as a plain decode leaves it out
            answer = answer.replace(token, "")
        new, self.forwarded = answer[self.forwarded:], len(answer)
        return self.then.push(new) if self.then is not None and new else new
