"""The one shape every conversation or text takes before a chat template renders it: an :class:`Example`.

Training reads it from a dataset's rows (:mod:`qlora.train.data.formats`); inference builds it from the messages it
is given (the reasoning probe of :mod:`qlora.infer.reasoning_reply`), so both tokenize it alike
(:mod:`qlora.chat.tokenize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora.chat.images import ImageRef
from qlora.chat.pieces import Piece


@dataclass(frozen=True)
class Example:
    """A normalized example: ``messages`` (chat) or ``text`` (plain), never both.

    Prompt-completion rows keep where the prompt ends, because only the completion is trained:
    ``prompt`` is the prompt text of a plain row (``text`` is then the completion), and
    ``prompt_turns`` the number of leading ``messages`` that form the prompt of a conversational one.
    ``tools`` are the tool definitions the chat template renders (``apply_chat_template(tools=...)``), and
    ``template_kwargs`` the row's own template variables (its ``chat_template_kwargs`` column, as TRL reads it).
    ``reasoning`` is ``(column, text)``: the reasoning trace of a plain prompt-completion row's completion.
    ``images`` are the row's images in the order its messages' ``{"type": "image"}`` parts place them
    (:mod:`qlora.chat.images`).
    ``skip`` says why the row holds nothing to train (``"an empty answer"``, ``"no messages"``): such rows are
    skipped and counted when tokenized, as blank texts are, rather than refusing a dataset for a few of them.
    """

    messages: tuple[dict[str, Any], ...] | None
    text: str | None
    where: str
    prompt: str | None = None
    prompt_turns: int | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    reasoning: tuple[str, str] | None = None
    skip: str | None = None
    images: tuple[ImageRef, ...] = ()
    pieces: tuple[Piece, ...] | None = None  # a row written piece by piece (:mod:`qlora.chat.pieces`)
    template_kwargs: dict[str, Any] | None = None

    @property
    def conversational(self) -> bool:
        """Messages, which a chat template renders (as a preference pair's or unpaired row's are)."""
        return self.messages is not None


def blank_text(example: Example) -> bool:
    """A plain text with nothing in it (a blank line of a corpus such as wikitext): nothing to learn."""
    return (example.messages is None and example.prompt is None and example.pieces is None
            and not (example.text or "").strip())


def render_kwargs(row: Any) -> dict[str, Any]:
    """What a row's conversation is rendered with beyond its messages: its tools and its own template variables
    (``row``: an :class:`Example`, or a preference or KTO example, which carry both), as TRL passes
    ``tools=..., **chat_template_kwargs``."""
    tools = {"tools": [dict(t) for t in row.tools]} if row.tools else {}
    return {**tools, **(row.template_kwargs or {})}
