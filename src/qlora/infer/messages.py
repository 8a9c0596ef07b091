"""Chat messages and the plain-text transcript form that memory prompts use.

A message is a role (``system``, ``user``, ``assistant``, ``tool``) and its text (a user message's images
with it, for vision-language models);
an assistant message may call tools and a tool message answers one call (the
OpenAI function-calling shapes, which chat templates render). LangChain
prompts show a conversation as ``Human: ...`` / ``AI: ...`` lines; the same
rendering is used here so its prompts work unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from qlora.chat.images import PLACEHOLDER as IMAGE_PLACEHOLDER  # LLaMA-Factory's, as training reads it
from qlora.chat.images import split_placeholders
from qlora.chat.reasoning import REASONING_KEYS
from qlora.errors import UsageError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: who spoke and what they said.

    ``tool_calls`` (assistant) are the calls it made, each ``{"id", "type": "function", "function":
    {"name", "arguments": dict}}`` as Hugging Face chat templates take them; ``tool_call_id`` (tool)
    names the call a tool result answers. ``reasoning`` (assistant) is what it thought before its text or calls:
    templates show it where the model wrote it, gpt-oss's analysis before a call, Qwen3's ``<think>`` block within
    the current turn, and drop it from earlier turns. ``name`` is OpenAI's participant name, which some templates
    show (Kimi K2's, in place of the role). ``parts`` are the texts of a content a client sent as a list of parts
    (an image's the ``<image>`` placeholder), which ``content`` joins with newlines between texts: a template that
    reads a content as a list gets them as parts, as vLLM hands them (:mod:`qlora.chat.content_parts`).
    """

    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    images: tuple[Any, ...] = ()  # ImageRefs (a user message's), at the <image> placeholders of the text or before it
    reasoning: str = ""
    name: str | None = None
    parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; choose from {', '.join(ROLES)}")
        marks = self.content.count(IMAGE_PLACEHOLDER) if self.images else 0
        if marks and marks != len(self.images):
            raise UsageError(f"the text has {marks} {IMAGE_PLACEHOLDER} placeholders for {len(self.images)} images; "
                             f"write one {IMAGE_PLACEHOLDER} where each image goes, or none (the images then go "
                             "before the text).")

    def as_dict(self, parts: bool = False) -> dict[str, Any]:
        """The message as chat templates receive it (only the keys it has); one with images has a content of
        parts, ``{"type": "image"}`` where each image goes (what templates of vision-language models render).
        ``parts``: the template reads a content as a list, so a content sent in parts is given as its parts."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if parts and self.parts:
            out["content"] = [q for piece in self.parts for q in (
                split_placeholders(piece) if self.images and IMAGE_PLACEHOLDER in piece else
                [{"type": "text", "text": piece}])]
        elif self.images:
            text = self.content
            if IMAGE_PLACEHOLDER not in text:
                text = IMAGE_PLACEHOLDER * len(self.images) + text
            out["content"] = split_placeholders(text)
        if self.tool_calls:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        if self.reasoning:  # under every name a template reads it by (vLLM's, Qwen3's and DeepSeek's, gpt-oss's)
            out.update(dict.fromkeys(REASONING_KEYS, self.reasoning))
        return out


def buffer_string(messages: Iterable[Message], human_prefix: str = "Human", ai_prefix: str = "AI") -> str:
    """The transcript as ``Human: ...``/``AI: ...`` lines (LangChain's ``get_buffer_string``); an assistant's
    tool calls follow its text as ``(tool call: NAME {arguments})``, as ``qlora chat`` prints them."""
    prefix = {"user": human_prefix, "assistant": ai_prefix, "system": "System", "tool": "Tool"}
    return "\n".join(f"{prefix[m.role]}: {_with_calls(m)}" for m in messages)


def _with_calls(message: Message) -> str:
    parts = [message.content] if message.content else []
    for call in message.tool_calls:
        fn = call.get("function", {})
        args = fn.get("arguments", {})
        parts.append(f"(tool call: {fn.get('name')} {args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)})")
    return "\n".join(parts)
