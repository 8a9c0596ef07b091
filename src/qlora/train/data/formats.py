"""Dataset formats and their normalization to conversations or raw text.

Users bring data in a handful of shapes. Everything downstream (templates,
tokenization, loss masks) works on one shape only: an :class:`Example` holding
either a list of ``{"role", "content"}`` messages or a raw text, so each
format's quirks are handled here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from qlora.errors import UsageError
from qlora.train.data.sources import Record

FORMATS = ("alpaca", "chat", "sharegpt", "text")
ROLES = ("system", "user", "assistant")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Example:
    """A normalized example: ``messages`` (chat) or ``text`` (plain), never both."""

    messages: tuple[dict[str, str], ...] | None
    text: str | None
    where: str


def detect_format(record: Record) -> str:
    """The format of a record, from its keys (checked on the first record of a dataset).

    Raises:
        UsageError: the keys match no known format.
    """
    keys = record.fields.keys()
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise UsageError(
        f"{record.where}: cannot tell the data format from the fields {sorted(keys)}. Expected "
        '"instruction"/"output" (alpaca), "messages" (chat), "conversations" (ShareGPT) or "text"; '
        "or pass --format explicitly."
    )


def normalize(records: list[Record], fmt: str = "auto") -> list[Example]:
    """Normalize records of one format (``"auto"``: detected from the first record).

    Raises:
        UsageError: unknown format, or a record missing a field the format needs.
    """
    if not records:
        raise UsageError("the dataset is empty; it needs at least one example.")
    if fmt == "auto":
        fmt = detect_format(records[0])
    if fmt not in FORMATS:
        raise UsageError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}.")
    convert: Callable[[dict[str, Any], str], Example] = _CONVERTERS[fmt]
    return [convert(r.fields, r.where) for r in records]


def _alpaca(fields: dict[str, Any], where: str) -> Example:
    instruction = _text_field(fields, "instruction", where, "alpaca")
    output = _text_field(fields, "output", where, "alpaca")
    extra = fields.get("input") or ""
    if not isinstance(extra, str):
        raise UsageError(f'{where}: field "input" must be a string in the alpaca format.')
    messages = []
    if fields.get("system"):
        messages.append({"role": "system", "content": _text_field(fields, "system", where, "alpaca")})
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": output})
    return Example(tuple(messages), None, where)


def _chat(fields: dict[str, Any], where: str) -> Example:
    raw = _list_field(fields, "messages", where, "chat")
    messages = []
    for i, m in enumerate(raw):
        role, content = _pair(m, "role", "content", f"{where}, message {i}", "chat")
        if role not in ROLES:
            raise UsageError(f"{where}, message {i}: role {role!r} is not one of {', '.join(ROLES)}.")
        messages.append({"role": role, "content": content})
    return Example(tuple(messages), None, where)


def _sharegpt(fields: dict[str, Any], where: str) -> Example:
    raw = _list_field(fields, "conversations", where, "ShareGPT")
    messages = []
    for i, m in enumerate(raw):
        speaker, content = _pair(m, "from", "value", f"{where}, turn {i}", "ShareGPT")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise UsageError(
                f"{where}, turn {i}: unknown ShareGPT speaker {speaker!r}; "
                f"expected one of {', '.join(sorted(SHAREGPT_ROLES))}."
            )
        messages.append({"role": role, "content": content})
    return Example(tuple(messages), None, where)


def _text(fields: dict[str, Any], where: str) -> Example:
    return Example(None, _text_field(fields, "text", where, "text"), where)


_CONVERTERS = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "text": _text}


def _text_field(fields: dict[str, Any], key: str, where: str, fmt: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or (key != "system" and not value.strip()):
        problem = "is missing" if value is None else "must be a non-empty string"
        raise UsageError(f'{where}: field "{key}" {problem} (format {fmt}).')
    return value


def _list_field(fields: dict[str, Any], key: str, where: str, fmt: str) -> list[Any]:
    value = fields.get(key)
    if not isinstance(value, list) or not value:
        problem = "is missing" if value is None else "must be a non-empty list"
        raise UsageError(f'{where}: field "{key}" {problem} (format {fmt}).')
    return value


def _pair(item: Any, key: str, value_key: str, where: str, fmt: str) -> tuple[str, str]:
    if not isinstance(item, dict) or not isinstance(item.get(key), str) or not isinstance(item.get(value_key), str):
        raise UsageError(f'{where}: each entry needs string fields "{key}" and "{value_key}" (format {fmt}).')
    return item[key], item[value_key]
