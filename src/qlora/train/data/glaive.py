"""glaiveai/glaive-function-calling-v2: a conversation written out as one string, read as messages with tools.

Its rows have two string columns. ``system`` is ``"SYSTEM: <prompt> Use them if required -"`` followed by the
function definitions as JSON objects one after another (or a prompt saying there are no functions); ``chat`` is
the transcript ``"USER: ... ASSISTANT: ... <|endoftext|> FUNCTION RESPONSE: ... ASSISTANT: ..."``, where an
assistant turn that calls a function writes ``<functioncall> {"name": ..., "arguments": '<JSON text>'}``
(the arguments a quoted string, so the call is a Python literal rather than JSON).

They become what :mod:`qlora.train.data.formats` reads from OpenAI-style tool-calling rows: a system message,
user and assistant messages (``<|endoftext|>``, glaive's end of turn, left to the chat template), an assistant
message with ``tool_calls``, ``tool`` results (named after the call they answer), and the definitions as
``tools`` (``{"type": "function", "function": definition}``) for the template to render.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from qlora.errors import UsageError

_TURN = re.compile(r"(?:^|\s+)(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]*")
_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_FUNCTIONS = "Use them if required -"
_CALL = "<functioncall>"
_END = "<|endoftext|>"


def is_transcript(fields: dict[str, Any]) -> bool:
    """Whether the row's ``chat`` column is a glaive transcript (a string starting with ``USER:``), and the row has
    no message list of its own."""
    chat = fields.get("chat")
    return "messages" not in fields and isinstance(chat, str) and _TURN.match(chat) is not None


def transcript(fields: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(messages, tools)`` of a glaive row: messages in OpenAI's shape (tool call arguments as JSON text or an
    object), the tool definitions from its ``system`` column.

    Raises:
        UsageError: text before the first ``USER:``, or function definitions or a call that do not parse.
    """
    system, tools = _system_and_tools(fields.get("system"), where)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    parts = _TURN.split(fields["chat"])
    if parts[0].strip():
        raise UsageError(f'{where}: the "chat" transcript must start with "USER:", "ASSISTANT:" or "FUNCTION '
                         f'RESPONSE:" (glaive-function-calling), not {parts[0].strip()[:40]!r}.')
    called = None
    for k, (speaker, text) in enumerate(zip(parts[1::2], parts[2::2])):
        text = text.strip()
        role = _ROLES[speaker]
        if role == "assistant":
            text = text.removesuffix(_END).rstrip()
            before, call, after = text.partition(_CALL)
            if call:
                called = _call(after.strip(), f"{where}, turn {k}")
                messages.append({"role": "assistant", "content": before.strip() or None,
                                 "tool_calls": [{"type": "function", "function": called}]})
                continue
        message = {"role": role, "content": text}
        if role == "tool" and called is not None:
            message["name"] = called["name"]
        messages.append(message)
    return messages, tools


def _system_and_tools(system: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt without its ``SYSTEM:`` label and function definitions, and the definitions."""
    if system is None:
        return "", []
    if not isinstance(system, str):
        raise UsageError(f'{where}: field "system" must be a string, got {type(system).__name__}.')
    text = system.strip().removeprefix("SYSTEM:").strip()
    prompt, marker, definitions = text.partition(_FUNCTIONS)
    if not marker:
        return text, []
    tools, decoder, pos = [], json.JSONDecoder(), 0
    while pos < len(definitions):
        if definitions[pos].isspace() or definitions[pos] == ",":
            pos += 1
            continue
        try:
            definition, pos = decoder.raw_decode(definitions, pos)
        except json.JSONDecodeError as e:
            raise UsageError(f'{where}: the function definitions after "{_FUNCTIONS}" in "system" are not JSON '
                             f"objects ({e.msg} at character {e.pos}).") from None
        if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
            raise UsageError(f'{where}: each function definition in "system" must be an object with a "name".')
        tools.append({"type": "function", "function": definition})
    return (prompt + marker).rstrip(" -") + ".", tools


def _call(text: str, where: str) -> dict[str, Any]:
    """``{"name", "arguments"}`` of a ``<functioncall>``: JSON, or glaive's literal with quoted JSON arguments."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        try:
            call = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise UsageError(f"{where}: the {_CALL} is not a JSON object nor glaive's "
                             '{"name": ..., "arguments": \'...\'}: ' f"{text[:80]!r}.") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise UsageError(f'{where}: the {_CALL} must be an object with a "name" and "arguments".')
    return {"name": call["name"], "arguments": call.get("arguments", {})}
