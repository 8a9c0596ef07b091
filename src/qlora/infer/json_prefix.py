"""An incremental JSON validator: is this text still the beginning of a valid JSON value?

Constrained decoding asks, for each candidate token, whether appending its text keeps
the reply a prefix of valid JSON; :class:`JsonPrefix` answers by feeding the new
characters to a small pushdown automaton (a stack of open containers and the state
inside the current token), never re-reading what came before. States are immutable:
:meth:`JsonPrefix.feed` returns a new state or ``None``, so trying a candidate
costs only its own characters and leaves the current state untouched.

With an :class:`ObjectSchema` (a tool's ``parameters``) the root must be an object and
its top level follows the schema cheaply: keys are unique (and only the declared
ones when ``additionalProperties`` is false), each declared property's value has one
of its declared JSON types (an integer has no fraction or exponent) or is one of its
``enum``/``const`` values, and the object only closes once every ``required`` key is
there. Nested values are checked as plain JSON. Runs of insignificant whitespace are
capped (:data:`MAX_WHITESPACE`), so a model cannot loop on spaces forever.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

MAX_WHITESPACE = 20  # longest run of whitespace between JSON tokens (deep pretty-printing fits)

_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = '"\\/bfnrtu'
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_FIRST_CHARS = {"string": '"', "number": "-" + _DIGITS, "integer": "-" + _DIGITS, "boolean": "tf", "null": "n",
                "object": "{", "array": "["}

# modes
_VALUE, _OBJ_FIRST, _OBJ_KEY, _KEY, _COLON, _STRING, _NUMBER, _LITERAL, _ENUM, _AFTER, _ARR_FIRST, _DONE = range(12)
# number states (sub of _NUMBER): which characters may come next
_MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(8)
_NUMBER_ENDS = (_ZERO, _INT, _FRAC, _EXP_DIGITS)


@dataclass(frozen=True)
class PropertyRule:
    """What a top-level property's value may be: JSON types (empty: any) or a fixed set of values."""

    first_chars: str = ""  # characters its value may start with ("" = any value)
    integer: bool = False  # a number without fraction or exponent
    literals: tuple[str, ...] = ()  # enum/const values as compact JSON text


@dataclass(frozen=True)
class ObjectSchema:
    """The part of a JSON Schema for an object that :class:`JsonPrefix` enforces at the top level."""

    properties: Mapping[str, PropertyRule]
    required: frozenset[str] = frozenset()
    closed: bool = False  # additionalProperties: false

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any] | None) -> "ObjectSchema":
        """The enforced part of an OpenAI function's ``parameters`` (anything else is not checked)."""
        schema = schema or {}
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        rules = {name: _rule(spec) for name, spec in props.items()}
        required = frozenset(k for k in schema.get("required", ()) if isinstance(k, str))
        closed = schema.get("additionalProperties") is False
        if closed:  # a required key that may not appear cannot be satisfied: keep the declared ones only
            required &= frozenset(rules)
        return cls(rules, required, closed)

    def allowed_keys(self, used: frozenset[str]) -> tuple[str, ...] | None:
        """Keys (as raw JSON string text) that may still be written; None: any new key."""
        if not self.closed:
            return None
        return tuple(_raw(k) for k in self.properties if k not in used)


_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "$schema", "$id", "$defs", "definitions"})  # change no valid value
_ROOT_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties"})
_PROPERTY_KEYWORDS = frozenset({"type", "enum", "const"})


def unenforced_keywords(schema: Mapping[str, Any]) -> list[str]:
    """Where ``schema`` asks more than :class:`ObjectSchema` enforces, as paths (``"properties.tags.items"``).

    Enforced: a root ``{"type": "object"}`` with ``properties``, ``required`` and
    ``additionalProperties`` (true or false), each property's ``type`` (JSON type names, or an
    ``anyOf`` of bare types; ``object`` and ``array`` only as such, their contents unchecked),
    ``enum`` and ``const``. Annotations
    (``title``, ``description``, ``default``, ...) change nothing and are never listed.
    """
    out = []
    if schema.get("type") != "object":
        out.append("type" if "type" in schema else "type (the root must be {\"type\": \"object\"})")
    out += [k for k in schema if k not in _ROOT_KEYWORDS | _ANNOTATIONS]
    extra = schema.get("additionalProperties", False)
    if not isinstance(extra, bool):
        out.append("additionalProperties")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        return out + ["properties"]
    for name, spec in props.items():
        where = f"properties.{name}"
        if not isinstance(spec, dict):
            out.append(where)
            continue
        union = "type" not in spec and _bare_type_union(spec.get("anyOf"))
        out += [f"{where}.{k}" for k in spec if k not in _PROPERTY_KEYWORDS | _ANNOTATIONS and not (union and k == "anyOf")]
        if any(t not in _FIRST_CHARS for t in _types(spec)):
            out.append(f"{where}.type")
    return out


def _raw(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)[1:-1]


def _rule(spec: Any) -> PropertyRule:
    if not isinstance(spec, dict):
        return PropertyRule()
    values = [spec["const"]] if "const" in spec else spec.get("enum")
    if isinstance(values, list) and values:
        return PropertyRule(literals=tuple(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in values))
    types = _types(spec)
    if not types or any(t not in _FIRST_CHARS for t in types):
        return PropertyRule()
    first = "".join(dict.fromkeys("".join(_FIRST_CHARS[t] for t in types)))
    return PropertyRule(first, integer="integer" in types and "number" not in types)


def _types(spec: Mapping[str, Any]) -> list[Any]:
    """The JSON types a property's value may have: its ``type`` (a name or a list), or an ``anyOf`` of
    bare types (``{"anyOf": [{"type": "integer"}, {"type": "null"}]}``, pydantic's ``int | None``)."""
    types = spec.get("type")
    if types is None and _bare_type_union(spec.get("anyOf")):
        types = [member["type"] for member in spec["anyOf"]]
    return [types] if isinstance(types, str) else types if isinstance(types, list) else []


def _bare_type_union(members: Any) -> bool:
    return isinstance(members, list) and bool(members) and all(
        isinstance(m, dict) and isinstance(m.get("type"), str) and set(m) <= {"type"} | _ANNOTATIONS for m in members)


class JsonPrefix:
    """The state after reading a prefix of a JSON value (see the module docstring).

    Args (of :meth:`start`):
        schema: top-level rules for the root object; None: any JSON value (an object if ``root_object``).
        root_object: the value must be an object.
    """

    __slots__ = ("stack", "mode", "sub", "ws", "schema", "used", "key", "rule")

    def __init__(self, stack: str, mode: int, sub: Any, ws: int, schema: ObjectSchema | None,
                 used: frozenset[str], key: str, rule: PropertyRule | None) -> None:
        self.stack, self.mode, self.sub, self.ws = stack, mode, sub, ws
        self.schema, self.used, self.key, self.rule = schema, used, key, rule

    @classmethod
    def start(cls, schema: ObjectSchema | None = None, root_object: bool = True) -> "JsonPrefix":
        first = PropertyRule("{") if root_object or schema is not None else None
        return cls("", _VALUE, None, -1, schema, frozenset(), "", first)

    @property
    def complete(self) -> bool:
        """Whether the text read so far is a whole JSON value (nothing more may follow an object)."""
        return self.mode == _DONE or (self.mode == _NUMBER and not self.stack and self.sub[0] in _NUMBER_ENDS)

    @property
    def closed(self) -> bool:
        """Whether the value is complete and nothing may follow (a root number may still grow)."""
        return self.mode == _DONE

    def accepts(self, text: str) -> bool:
        return self.feed(text) is not None

    def feed(self, text: str) -> "JsonPrefix | None":
        """The state after ``text`` is appended, or None if no valid JSON begins with the result."""
        stack, mode, sub, ws, used, key, rule = self.stack, self.mode, self.sub, self.ws, self.used, self.key, self.rule
        schema = self.schema
        for ch in text:
            if mode == _STRING or mode == _KEY:
                if sub == 0:
                    if ch == '"':
                        if mode == _KEY:
                            if schema is not None and stack == "{":
                                allowed = schema.allowed_keys(used)
                                if allowed is not None and key not in allowed:
                                    return None
                                name = json.loads(f'"{key}"')
                                if name in used:
                                    return None
                                used, rule = used | {name}, schema.properties.get(name)
                            mode, ws = _COLON, 0
                        else:
                            mode, ws = (_AFTER if stack else _DONE), 0
                        key = ""
                        continue
                    if ch == "\\":
                        sub = -1
                    elif ch < " ":
                        return None
                elif sub == -1:
                    if ch not in _ESCAPES:
                        return None
                    sub = 4 if ch == "u" else 0
                else:
                    if ch not in _HEX:
                        return None
                    sub -= 1
                if mode == _KEY and schema is not None and stack == "{":
                    key += ch
                    allowed = schema.allowed_keys(used)
                    if allowed is not None and not any(k.startswith(key) for k in allowed):
                        return None
                continue
            if mode == _NUMBER:
                state, integer = sub
                nxt = _number_step(state, ch, integer)
                if nxt is not None:
                    sub = (nxt, integer)
                    continue
                if state not in _NUMBER_ENDS or not stack:
                    return None
                mode, ws = _AFTER, 0  # the number ended; read ch as what follows it
            elif mode == _LITERAL:
                if ch != sub[0]:
                    return None
                sub = sub[1:]
                if not sub:
                    mode, ws = (_AFTER if stack else _DONE), 0
                continue
            elif mode == _ENUM:
                typed, options = sub
                grown = typed + ch
                if any(o.startswith(grown) for o in options):
                    sub = (grown, options)
                    continue
                if typed not in options:
                    return None
                mode, ws = _AFTER, 0  # the value ended; read ch as what follows it
            if ch in _WS:
                if mode == _DONE or ws < 0 or ws >= MAX_WHITESPACE:
                    return None
                ws += 1
                continue
            if mode == _VALUE or mode == _ARR_FIRST:
                if mode == _ARR_FIRST and ch == "]":
                    stack = stack[:-1]
                    mode, ws = (_AFTER if stack else _DONE), 0
                    continue
                if rule is not None:
                    if rule.literals:
                        if not any(o.startswith(ch) for o in rule.literals):
                            return None
                        mode, sub, ws, rule = _ENUM, (ch, rule.literals), 0, None
                        continue
                    if rule.first_chars and ch not in rule.first_chars:
                        return None
                integer = rule is not None and rule.integer
                rule = None
                ws = 0
                if ch == "{":
                    stack += "{"
                    mode = _OBJ_FIRST
                elif ch == "[":
                    stack += "["
                    mode = _ARR_FIRST
                elif ch == '"':
                    mode, sub = _STRING, 0
                elif ch == "-" or ch in _DIGITS:
                    mode, sub = _NUMBER, (_MINUS if ch == "-" else _ZERO if ch == "0" else _INT, integer)
                elif ch in _LITERALS:
                    mode, sub = _LITERAL, _LITERALS[ch]
                else:
                    return None
                continue
            if mode == _OBJ_FIRST or mode == _OBJ_KEY:
                top = schema is not None and stack == "{"
                if ch == '"':
                    if top:
                        allowed = schema.allowed_keys(used)
                        if allowed is not None and not allowed:
                            return None
                    mode, sub, ws, key = _KEY, 0, 0, ""
                    continue
                if ch == "}" and mode == _OBJ_FIRST:
                    if top and not schema.required <= used:
                        return None
                    stack = stack[:-1]
                    mode, ws = (_AFTER if stack else _DONE), 0
                    continue
                return None
            if mode == _COLON:
                if ch != ":":
                    return None
                mode, ws = _VALUE, 0
                continue
            if mode == _AFTER:
                top = schema is not None and stack == "{"
                if ch == ",":
                    if stack[-1] == "{":
                        if top:
                            allowed = schema.allowed_keys(used)
                            if allowed is not None and not allowed:
                                return None
                        mode = _OBJ_KEY
                    else:
                        mode = _VALUE
                    ws = 0
                    continue
                if ch == "}" and stack[-1] == "{":
                    if top and not schema.required <= used:
                        return None
                elif not (ch == "]" and stack[-1] == "["):
                    return None
                stack = stack[:-1]
                mode, ws = (_AFTER if stack else _DONE), 0
                continue
            return None  # _DONE: nothing may follow the root value
        return JsonPrefix(stack, mode, sub, ws, schema, used, key, rule)


def _number_step(state: int, ch: str, integer: bool) -> int | None:
    """The number state after ``ch``, or None when ``ch`` cannot continue the number."""
    digit = ch in _DIGITS
    if state == _MINUS:
        return (_ZERO if ch == "0" else _INT) if digit else None
    if state in (_ZERO, _INT):
        if digit and state == _INT:
            return _INT
        if integer:
            return None
        return _DOT if ch == "." else _EXP if ch in "eE" else None
    if state in (_DOT, _FRAC):
        if digit:
            return _FRAC
        return _EXP if state == _FRAC and ch in "eE" else None
    if state == _EXP:
        return _EXP_DIGITS if digit else _EXP_SIGN if ch in "+-" else None
    return _EXP_DIGITS if digit else None  # _EXP_SIGN, _EXP_DIGITS
