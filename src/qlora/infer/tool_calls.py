"""Tool calls in generated text: which markup a chat template uses, and parsing it out.

A model fine-tuned on tool-calling data writes its calls in the markup its chat
template renders them with, so the parser is chosen from the template (never
from the model's name):

- ``hermes`` (Qwen 2.5/3, Hermes, most ChatML tool templates):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call;
- ``glm-4.5``: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v0.3, Nemo), or
  ``[TOOL_CALLS]NAME[ARGS]{...}`` per call (tokenizer v11 and later);
- ``deepseek-v3`` (V3, R1): ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME``
  then the arguments in a json code block, ``<｜tool▁call▁end｜>``...;
- ``json`` (Llama 3.1/3.2, and any other template that renders tools without a known markup):
  the whole reply is ``{"name": ..., "parameters"/"arguments": {...}}`` (several joined by ``;``),
  optionally after ``<|python_tag|>``; the name must be one of the offered tools, since nothing
  else tells a call from an answer that happens to be JSON.

Parsing is all or nothing: markup that does not parse (bad JSON, a missing name, a block
cut off by the token limit) leaves the whole reply as plain content with no calls, never an error.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Callable, Sequence

from .text_stream import held_suffix


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text of an object (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCallFormat:
    """How a template's model writes tool calls.

    ``starts``: markup that opens the calls; text from there on is held back while streaming.
    ``at_start``: calls only count when the reply begins with them (bare JSON).
    ``id_length``: Mistral templates accept only 9-character alphanumeric call ids.
    """

    name: str
    starts: tuple[str, ...]
    split: Callable[[str, frozenset[str]], "tuple[str, list[ToolCall]] | None"]
    at_start: bool = False
    id_length: int | None = None

    def parse(self, text: str, tool_names: Sequence[str] = ()) -> tuple[str, list[ToolCall]]:
        """``(content, calls)`` of a reply: the text outside the call markup, and the calls in order.

        Unparseable markup gives ``(text, [])``.
        """
        if not self.begins_calls(text):
            return text, []
        found = self.split(text, frozenset(tool_names))
        return found if found is not None and found[1] else (text, [])

    def begins_calls(self, text: str) -> bool:
        """Whether ``text`` holds the opening markup (at its start for bare-JSON formats)."""
        if self.at_start:
            return text.lstrip().startswith(self.starts)
        return any(s in text for s in self.starts)

    def held_from(self, text: str) -> int:
        """Where text that may become call markup begins (``len(text)``: none yet); streaming holds it back."""
        if self.at_start:
            stripped = text.lstrip()
            if not stripped or any(s.startswith(stripped) or stripped.startswith(s) for s in self.starts):
                return 0
            return len(text)
        first = min((i for s in self.starts if (i := text.find(s)) >= 0), default=len(text))
        return min(first, len(text) - held_suffix(text, self.starts))  # a suffix that may grow into a marker

    def new_id(self) -> str:
        """A fresh call id: ``call_`` + 24 hex digits, or the 9 alphanumerics Mistral templates require."""
        if self.id_length:
            alphabet = string.ascii_letters + string.digits
            return "".join(secrets.choice(alphabet) for _ in range(self.id_length))
        return "call_" + secrets.token_hex(12)


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


def tool_definition_problem(tools: Sequence[object]) -> tuple[str, str] | None:
    """The first problem in OpenAI tool definitions, as ``(message, field)`` (e.g. ``tools.0.function.name``),
    or None: each must be a function tool with a valid, unique name and a JSON-schema object of parameters."""
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            return f"{where}.type must be 'function' (the only tool type chat models take), got {kind!r}", \
                f"{where}.type"
        fn = tool.get("function")  # type: ignore[union-attr]
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            return f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}", \
                f"{where}.function.name"
        if name in names:
            return f"{where}.function.name {name!r} is given twice; tool names must be unique", \
                f"{where}.function.name"
        names.add(name)
        if not isinstance(fn.get("parameters", {}), dict):
            return f"{where}.function.parameters must be a JSON Schema object", f"{where}.function.parameters"
        if not isinstance(fn.get("strict", False), (bool, type(None))):
            return f"{where}.function.strict must be true or false, got {fn['strict']!r}", f"{where}.function.strict"
    return None


def _call(obj: object, names: frozenset[str] = frozenset()) -> ToolCall | None:
    """A ``{"name", "arguments"|"parameters"}`` object as a call (arguments: an object, or its JSON text)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if names and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return _with_arguments(obj["name"], args)


def _with_arguments(name: str, args: object) -> ToolCall | None:
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list | None:
    """The JSON values ``text`` holds one after another (separated by space or ``;``), or None."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return None
        values.append(value)


_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)


def _hermes(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    calls = []
    for block in _HERMES_BLOCK.finditer(text):
        values = _json_values(block.group(1))
        if not values or len(values) != 1 or (call := _call(values[0])) is None:
            return None
        calls.append(call)
    return _HERMES_BLOCK.sub("", text), calls


_GLM_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def _glm(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    calls = []
    for block in _GLM_BLOCK.finditer(text):
        head, sep, rest = block.group(1).partition("<arg_key>")
        name = head.strip()
        if not name or "\n" in name or _GLM_ARG.sub("", sep + rest).strip():
            return None
        args = {}
        for key, value in _GLM_ARG.findall(sep + rest):
            try:  # the template writes strings as they are and other values as JSON
                args[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                args[key.strip()] = value
        calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
    rest = _GLM_BLOCK.sub("", text)
    return (rest, calls) if "<tool_call>" not in rest else None


_MISTRAL = "[TOOL_CALLS]"


def _mistral(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    content, _, after = text.partition(_MISTRAL)
    calls: list[ToolCall] = []
    if after.lstrip().startswith("["):  # v0.3 / Nemo: one JSON list of calls
        values = _json_values(after)
        if not values or len(values) != 1 or not isinstance(values[0], list):
            return None
        calls = [c for c in map(_call, values[0]) if c is not None]
        if len(calls) != len(values[0]):
            return None
        return content, calls
    for piece in after.split(_MISTRAL):  # v11+: NAME[ARGS]{...}, one marker per call
        name, sep, args = piece.partition("[ARGS]")
        name = name.split("[CALL_ID]")[0].strip()
        values = _json_values(args) if sep else None
        if not name or not values or len(values) != 1 or (call := _with_arguments(name, values[0])) is None:
            return None
        calls.append(call)
    return content, calls


_DS_BEGIN, _DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL = re.compile(r"<｜tool▁call▁begin｜>\s*(\w+)\s*<｜tool▁sep｜>\s*(.*?)\n```(?:json)?\s*\n?(.*?)\s*```\s*"
                      r"<｜tool▁call▁end｜>", re.S)


def _deepseek(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    content, _, after = text.partition(_DS_BEGIN)
    body, _, tail = after.partition(_DS_END)
    calls = []
    for kind, name, args in _DS_CALL.findall(body):
        values = _json_values(args)
        if kind != "function" or not values or len(values) != 1 or (
                call := _with_arguments(name.strip(), values[0])) is None:
            return None
        calls.append(call)
    if _DS_CALL.sub("", body).strip():  # something in the block that is not a whole call
        return None
    return content + tail, calls


_PYTHON_TAG = "<|python_tag|>"


def _bare_json(text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]] | None:
    body = text.strip()
    body = body[len(_PYTHON_TAG):] if body.startswith(_PYTHON_TAG) else body
    values = _json_values(body)
    if not values:
        return None
    calls = [_call(v, names) for v in values]
    return ("", calls) if all(calls) else None  # type: ignore[return-value]


FORMATS = {
    "mistral": ToolCallFormat("mistral", (_MISTRAL,), _mistral, id_length=9),
    "deepseek-v3": ToolCallFormat("deepseek-v3", (_DS_BEGIN,), _deepseek),
    "glm-4.5": ToolCallFormat("glm-4.5", ("<tool_call>",), _glm),
    "hermes": ToolCallFormat("hermes", ("<tool_call>",), _hermes),
    "json": ToolCallFormat("json", ("{", _PYTHON_TAG), _bare_json, at_start=True),
}
# What in a template tells its call markup, checked in this order (GLM's blocks are <tool_call> blocks too).
_SIGNS = (("mistral", _MISTRAL), ("deepseek-v3", "tool▁calls▁begin"), ("glm-4.5", "<arg_key>"),
          ("hermes", "<tool_call>"))


def tool_call_format(template: str) -> ToolCallFormat:
    """The call format of a chat template that renders tools: by its markup, else bare JSON (Llama 3.x)."""
    for name, sign in _SIGNS:
        if sign in template:
            return FORMATS[name]
    return FORMATS["json"]


def markup_token_ids(fmt: ToolCallFormat, tokenizer) -> frozenset[int]:
    """Ids of the special tokens among ``fmt``'s markup (Mistral's ``[TOOL_CALLS]``, Llama's
    ``<|python_tag|>``): decoding must keep them, where it drops other special tokens, to see the calls."""
    specials = set(tokenizer.all_special_ids)
    markers = (*fmt.starts, _DS_END, "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", "[ARGS]",
               "[CALL_ID]", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[m] for m in markers if m in vocab and vocab[m] in specials)


class ToolCallStream:
    """Split a streamed reply into content to show now and calls parsed at its end.

    Text that may be call markup is held back from where it starts; at the end the whole
    reply is parsed, and what was held is released as content if it held no valid calls.
    """

    def __init__(self, fmt: ToolCallFormat, tool_names: Sequence[str] = ()) -> None:
        self.fmt, self.tool_names = fmt, tuple(tool_names)
        self.text = ""
        self.shown = 0  # characters released as content
        self.settled = False  # bare-JSON formats: the reply did not start with a call

    def push(self, piece: str) -> str:
        """Add generated text; return the content that is safe to show."""
        self.text += piece
        if self.settled:
            return self._release(len(self.text))
        held = self.fmt.held_from(self.text)
        if self.fmt.at_start and held == len(self.text):
            self.settled = True
        return self._release(max(held, self.shown))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not shown yet and the calls of the whole reply."""
        content, calls = self.fmt.parse(self.text, self.tool_names) if not self.settled else (self.text, [])
        if not content.startswith(self.text[:self.shown]):  # cannot happen: calls start after shown text
            return self.text[self.shown:], []
        return content[self.shown:], calls

    def _release(self, end: int) -> str:
        piece = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return piece
