"""glaiveai/glaive-function-calling (v1 and v2): a conversation written out as one string, read as messages with tools.

v2's rows have two string columns. ``system`` is ``"SYSTEM: <prompt> Use them if required -"`` followed by the
function definitions as JSON objects one after another (or a prompt saying there are no functions); ``chat`` is
the transcript ``"USER: ... ASSISTANT: ... <|endoftext|> FUNCTION RESPONSE: ... ASSISTANT: ..."``, where an
assistant turn that calls a function writes ``<functioncall> {"name": ..., "arguments": '<JSON text>'}``
(the arguments a quoted string, so the call is a Python literal rather than JSON). v1's rows have one column,
``sample``: the same system prompt (``"... you can use the functions if needed-"`` and the definitions) and the
transcript after it, so it is split at its first turn and read as a v2 row.

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
_SYSTEM = "SYSTEM:"
# the function definitions start at a "{" opening a line or following the prompt's closing "-"
_DEFINITIONS = re.compile(r"(?m)(?:^|(?<=-))[ \t]*(?=\{)")
_CALL = "<functioncall>"
# glaive's call: JSON but for its arguments, JSON text in single quotes (over several lines in v1)
_QUOTED_CALL = re.compile(r"""\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*'(.*)'\s*\}""", re.S)
_END = "<|endoftext|>"


def transcript_column(fields: dict[str, Any]) -> str | None:
    """The column holding a row's glaive transcript (v2's ``chat``, v1's ``sample``) when it has no message list
    of its own, or None."""
    if "messages" in fields:
        return None
    return next((key for key in ("chat", "sample") if isinstance(fields.get(key), str)), None)


def is_transcript(fields: dict[str, Any]) -> bool:
    """Whether the row is a glaive transcript: a ``chat`` string starting with ``USER:``, or a ``sample`` string
    starting with ``SYSTEM:`` or a turn, and no message list of its own."""
    column = transcript_column(fields)
    text = fields.get(column, "")
    return column is not None and (_TURN.match(text) is not None
                                   or (column == "sample" and text.lstrip().startswith(_SYSTEM)))


def transcript(fields: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(messages, tools)`` of a glaive row: messages in OpenAI's shape (tool call arguments as JSON text or an
    object), the tool definitions from its system prompt.

    Raises:
        UsageError: text before the first turn (v1: before ``SYSTEM:`` or the first turn), or function definitions
            or a call that do not parse.
    """
    column = transcript_column(fields)
    system, chat = fields.get("system"), fields[column]
    if column == "sample":
        system, chat = _split_sample(chat)
    system, tools = _system_and_tools(system, where)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    parts = _TURN.split(chat)
    if parts[0].strip():
        first = '"SYSTEM:", "USER:"' if column == "sample" else '"USER:"'
        raise UsageError(f'{where}: the "{column}" transcript must start with {first}, "ASSISTANT:" or "FUNCTION '
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


def _split_sample(sample: str) -> tuple[str | None, str]:
    """A v1 ``sample``'s system prompt (None without ``SYSTEM:``) and its transcript, which starts at the first
    turn."""
    if not sample.lstrip().startswith(_SYSTEM):
        return None, sample
    first = _TURN.search(sample)
    return (sample, "") if first is None else (sample[:first.start()], sample[first.start():])


def _system_and_tools(system: Any, where: str) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt without its ``SYSTEM:`` label and function definitions, and the definitions."""
    if system is None:
        return "", []
    if not isinstance(system, str):
        raise UsageError(f'{where}: field "system" must be a string, got {type(system).__name__}.')
    text = system.strip().removeprefix(_SYSTEM).strip()
    start = _DEFINITIONS.search(text)
    if start is None:
        return text, []
    prompt, definitions = text[:start.start()].rstrip().rstrip(" -:"), text[start.start():]
    tools, decoder, pos = [], json.JSONDecoder(), 0
    while pos < len(definitions):
        if definitions[pos].isspace() or definitions[pos] == ",":
            pos += 1
            continue
        try:
            definition, pos = decoder.raw_decode(definitions, pos)
        except json.JSONDecodeError as e:
            raise UsageError(f'{where}: the function definitions in the system prompt are not JSON objects '
                             f"({e.msg} at character {e.pos} of them).") from None
        if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
            raise UsageError(f'{where}: each function definition in the system prompt must be an object with a '
                             '"name".')
        tools.append({"type": "function", "function": definition})
    return (prompt + "." if prompt and prompt[-1] not in ".!?" else prompt), tools


def _call(text: str, where: str) -> dict[str, Any]:
    """``{"name", "arguments"}`` of a ``<functioncall>``: JSON, or glaive's literal with quoted JSON arguments."""
    quoted = _QUOTED_CALL.fullmatch(text)
    try:
        call = {"name": quoted[1], "arguments": quoted[2]} if quoted else json.loads(text)
    except json.JSONDecodeError:
        try:
            call = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise UsageError(f"{where}: the {_CALL} is not a JSON object nor glaive's "
                             '{"name": ..., "arguments": \'...\'}: ' f"{text[:80]!r}.") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise UsageError(f'{where}: the {_CALL} must be an object with a "name" and "arguments".')
    return {"name": call["name"], "arguments": call.get("arguments", {})}
