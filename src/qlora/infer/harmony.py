"""gpt-oss's harmony replies: the answer, the reasoning and the tool calls, without the channel markup.

A harmony model writes its reply as messages, each a header and a body: ``<|channel|>analysis<|message|>...<|end|>``
(its reasoning), then ``<|start|>assistant<|channel|>final<|message|>...`` (the answer, ended by the stop token
``<|return|>``), or a call ``<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>{...}`` (ended by
``<|call|>``; the recipient may also follow the channel name). Its generation prompt ends with ``<|start|>assistant``,
so the reply begins with the first header. Decoding drops the special tokens but not the words between them, so a
plain decode reads ``analysis...assistantfinal...``: the reply is decoded with the markup tokens kept
(:func:`markup_token_ids`) and split here. What a user reads is the final channel, and commentary without a recipient
(harmony's preambles, meant for the user); the analysis channel is reasoning, kept apart and never shown as the
answer; a message to ``functions.NAME`` is a call (a reply offered no tools keeps it as text). A reply that opens
with no header (a model never trained in harmony) is plain text.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from .text_stream import held_suffix
from .tool_calls import ToolCall

START, CHANNEL, MESSAGE, END, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|constrain|>"
ENDS = (END, "<|return|>", "<|call|>")  # a message's end; the last two are stop tokens, shown only when kept
MARKUP = (START, CHANNEL, MESSAGE, END, CONSTRAIN, "<|return|>", "<|call|>")
_OPENINGS = (CHANNEL, " to=", CONSTRAIN)  # how a header right after the prompt's ``<|start|>assistant`` begins
_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_.-]+)")
_VISIBLE = ("final", "commentary")  # channels a user reads (commentary only without a recipient)


def is_harmony(tokenizer, template: str | None) -> bool:
    """Whether ``template`` prompts in harmony: it writes channels, and the vocabulary has their tokens."""
    vocab = tokenizer.get_vocab()
    return bool(template) and CHANNEL in template and all(t in vocab for t in (START, CHANNEL, MESSAGE))


def markup_token_ids(tokenizer) -> frozenset[int]:
    """Ids of harmony's markup tokens, which decoding must keep for :class:`HarmonyStream` to read the channels."""
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in MARKUP if t in vocab)


class _Message:
    """One message of a reply: its header's channel and recipient, its body, and whether an end marker closed it
    (the stop token that ends a reply is not in its text unless kept)."""

    def __init__(self, header: str, body: str, closed: bool) -> None:
        head = header.split(CHANNEL, 1)[1] if CHANNEL in header else ""
        self.channel = re.split(r"[\s<]", head.strip(), maxsplit=1)[0] if head.strip() else ""
        found = _RECIPIENT.search(header)
        self.recipient = found.group(1) if found else None
        self.body, self.closed = body, closed


def messages(text: str) -> tuple[list[_Message], str | None]:
    """The messages of ``text`` (a reply decoded with the markup kept) and the text of a header still being written
    (None when the text ends inside a body or at a message's end)."""
    out: list[_Message] = []
    for part in text.split(START):
        if MESSAGE not in part:
            if part:
                return out, part
            continue
        header, body = part.split(MESSAGE, 1)
        ends = [i for i in (body.find(e) for e in ENDS) if i >= 0]
        out.append(_Message(header, body[:min(ends)] if ends else body, bool(ends)))
    return out, None


class HarmonyStream:
    """Split a streamed harmony reply into the text a user reads (released as it comes), its reasoning and its calls.

    ``tool_names``: the tools offered (None: none were, and a call stays text). Same use as
    :class:`~qlora.infer.tool_calls.ToolCallStream`: :meth:`push` each decoded piece, :meth:`finish` at the end.
    """

    def __init__(self, tool_names: Sequence[str] | None = None) -> None:
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self.text = ""
        self.shown = 0  # characters of the visible text released
        self.taken = 0  # characters of the reasoning taken (:meth:`take_reasoning`)
        self.plain: bool | None = None  # the reply has no harmony header (decided at its first characters)

    def push(self, piece: str) -> str:
        """Add decoded text; return the text for the user that is safe to show."""
        self.text += piece
        if self.plain is None:
            opening = self.text.lstrip()
            if any(o.startswith(opening) for o in _OPENINGS):
                return ""  # too short to tell
            self.plain = not opening.startswith(_OPENINGS)
        if self.plain:
            return self._release(_without_markup(self.text))
        found, header = messages(self.text)
        visible = self._visible(found)
        if header is None and found and not found[-1].closed:
            visible = visible[:len(visible) - held_suffix(visible, ENDS)]
        return self._release(visible)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The visible text not released yet and the calls of the whole reply (all or nothing, as
        :mod:`~qlora.infer.tool_calls`: a call that does not parse keeps its text, with no calls)."""
        if self.plain is not False:
            self.plain = True
            return self._release(_without_markup(self.text)), []
        found, header = messages(self.text)
        calls, failed = [], False
        if self.tool_names is not None:
            for m in found:
                if m.recipient is not None and (call := self._call(m)) is not None:
                    calls.append(call)
                elif m.recipient is not None:
                    failed = True
        visible = self._visible(found, with_calls=failed or self.tool_names is None)
        if header is not None and not found:  # a header the reply never finished: its text is all there is
            visible = header
        return self._release(visible), [] if failed else calls

    @property
    def reasoning(self) -> str:
        """The analysis channel's text (the reply's reasoning), messages separated by a blank line."""
        if self.plain is not False:
            return ""
        return "\n\n".join(m.body for m in messages(self.text)[0] if m.channel == "analysis" and m.body)

    def take_reasoning(self) -> str:
        """The reasoning written since the last call (the analysis channel grows only at its end)."""
        done = self.reasoning
        new, self.taken = done[self.taken:], max(self.taken, len(done))
        return new

    def _visible(self, found: list[_Message], with_calls: bool = False) -> str:
        parts = [m.body for m in found if m.channel != "analysis" and (
            m.recipient is None and m.channel in _VISIBLE or with_calls and m.recipient is not None)]
        return "\n\n".join(p for p in parts if p)

    def _call(self, message: _Message) -> ToolCall | None:
        if self.tool_names and message.recipient not in self.tool_names:
            return None
        try:
            args = json.loads(message.body) if message.body.strip() else {}
        except json.JSONDecodeError:
            return None
        return ToolCall(message.recipient, json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None

    def _release(self, visible: str) -> str:
        piece = visible[self.shown:] if len(visible) > self.shown else ""
        self.shown = max(self.shown, len(visible))
        return piece


def _without_markup(text: str) -> str:
    """A plain reply's text as a plain decode shows it: markup tokens written where they mark nothing (a model never
    trained in harmony) are special tokens, which decoding leaves out."""
    for token in MARKUP:
        text = text.replace(token, "")
    return text
