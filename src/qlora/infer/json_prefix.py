"""An incremental JSON Schema validator: is this text still the beginning of a valid document?

Constrained decoding asks, for each candidate token, whether appending its text keeps
the reply a prefix of a JSON document valid under the schema; :class:`JsonPrefix` answers
by feeding the new characters to a pushdown automaton, never re-reading what came before.
States are immutable: :meth:`JsonPrefix.feed` returns a new state or ``None``, so trying a
candidate costs only its own characters and leaves the current state untouched.

The schema is compiled once (:func:`qlora.infer.json_schema.compile_schema`, which says
what is enforced); the automaton follows it at every depth. A state is a set of *threads*,
each a deterministic reading of the text: where a value may follow several schemas
(``anyOf``, ``Optional``'s ``null``, overlapping types) one thread per schema is started at
the value's first character, and threads die as characters rule them out, so a union
costs only while it is undecided. A thread is a tuple ``(stack, mode, sub, ws, node)``:
the open containers as a linked list ``(kind, schema, used keys or item count, parent)``,
shared between states, what is being read, its lexical state, the whitespace run, and the
schema of the value being read. Alternatives that stay undecided while containers nest
(``anyOf`` of two array schemas that both recurse) would multiply threads at each level:
at most :data:`MAX_THREADS` are kept, the first in schema order, which keeps every
accepted prefix valid and completable and only drops readings of such pathological
schemas. Runs of insignificant whitespace are capped (:data:`MAX_WHITESPACE`), so a model
cannot loop on spaces forever. A string under a ``pattern`` or ``format`` carries the
state set of its compiled automaton (:mod:`qlora.infer.regex`), stepped by each decoded
character, and a bounded number its text (:mod:`qlora.infer.number_range`), so each
character is checked against every completion the value still has.

Every prefix accepted can be completed into a valid document (the compiler prunes what no
finite value satisfies), so decoding under it never reaches a dead end.
"""

from __future__ import annotations

from .json_schema import ANY, OBJECT, Node

MAX_WHITESPACE = 20  # longest run of whitespace between JSON tokens (deep pretty-printing fits)
MAX_THREADS = 64  # readings followed at once; beyond, the first ones (in anyOf order) are kept

_WS = " \t\n\r"
_DIGITS = "0123456789"
_HEX = "0123456789abcdefABCDEF"
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "u": ""}
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_LITERAL_TYPES = {"t": "boolean", "f": "boolean", "n": "null"}

# modes
(_VALUE, _OBJ_FIRST, _OBJ_KEY, _KEY, _COLON, _STRING, _CSTRING, _NUMBER, _LITERAL, _ENUM, _AFTER, _ARR_FIRST,
 _DONE, _PSTRING, _RNUMBER) = range(15)
# number states (sub of _NUMBER): which characters may come next
_MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(8)
_NUMBER_ENDS = (_ZERO, _INT, _FRAC, _EXP_DIGITS)
# a checked string's state: (escape: 0 none, -1 after a backslash, 1-4 hex digits left; the code point read so
# far of a \u escape; whether the last character was a high surrogate; length in code points; text or None)
_STR_KEY = (0, 0, False, 0, "")
_STR_VALUE = (0, 0, False, 0, None)
# a string under a pattern: (escape as above; its code so far; a high surrogate waiting for its pair, or 0; the
# pattern's state set). A bounded number: (number state, its text so far).
_DONE_THREAD = (None, _DONE, None, 0, None)


class JsonPrefix:
    """The state after reading a prefix of a JSON document (see the module docstring)."""

    __slots__ = ("threads",)

    def __init__(self, threads: tuple) -> None:
        self.threads = threads

    @classmethod
    def start(cls, schema: Node | None = None, root_object: bool = True) -> "JsonPrefix":
        """Before the first character: ``schema`` a compiled schema's root; None: any JSON value (any
        object if ``root_object``)."""
        node = schema if schema is not None else OBJECT if root_object else ANY
        return cls(((None, _VALUE, None, -1, node),))

    @property
    def complete(self) -> bool:
        """Whether the text read so far is a whole valid document (a root number may still grow)."""
        for stack, mode, sub, _, node in self.threads:
            if mode == _DONE:
                return True
            if stack is None and ((mode == _NUMBER and sub[0] in _NUMBER_ENDS) or (mode == _ENUM and sub[0] in sub[1])
                                  or (mode == _RNUMBER and sub[0] in _NUMBER_ENDS and node.range.holds(sub[1]))):
                return True
        return False

    @property
    def closed(self) -> bool:
        """Whether the document is complete and nothing may follow."""
        return all(t[1] == _DONE for t in self.threads)

    def accepts(self, text: str) -> bool:
        return self.feed(text) is not None

    def feed(self, text: str) -> "JsonPrefix | None":
        """The state after ``text`` is appended, or None if no valid document begins with the result."""
        threads = self.threads
        for ch in text:
            if len(threads) == 1:
                out = _step(threads[0], ch)
                if out is None:
                    return None
                threads = tuple(dict.fromkeys(out))[:MAX_THREADS] if type(out) is list else (out,)
                continue
            merged: dict = {}
            for thread in threads:
                out = _step(thread, ch)
                if type(out) is list:
                    merged.update(dict.fromkeys(out))
                elif out is not None:
                    merged[out] = None
            if not merged:
                return None
            threads = tuple(merged)[:MAX_THREADS]
        return JsonPrefix(threads)

    def admits(self, low: int, high: int) -> bool:
        """Whether some character in ``low..high`` (non-ASCII: what a partial UTF-8 character may become) may come
        next, written raw (only inside a string)."""
        return any(_admits(thread, low, high) for thread in self.threads)


def _admits(thread, low: int, high: int) -> bool:
    """:meth:`JsonPrefix.admits` for one thread: mirrors what :func:`_step` takes of a non-ASCII character (only
    strings do: an ``_ENUM``'s literals are numbers, booleans and null, as ``json.dumps`` writes them)."""
    stack, mode, sub, _, node = thread
    if mode == _STRING:
        return sub == 0
    if mode == _PSTRING:
        return sub[0] == 0 and not sub[2] and node.pattern.any_in(sub[3], low, high)
    if mode != _KEY and mode != _CSTRING or sub[0] != 0:
        return False
    _, _, _, length, text = sub
    if mode == _CSTRING and length + 1 > node.max_length:
        return False
    candidates = _candidates(stack, mode, node)
    return candidates is None or any(len(c) > len(text) and c.startswith(text) and low <= ord(c[len(text)]) <= high
                                     for c in candidates)


def _ended(parent):
    """The thread after a value closed inside ``parent`` (None: the root)."""
    return _DONE_THREAD if parent is None else (parent, _AFTER, None, 0, None)


def _step(thread, ch: str):
    """A thread after ``ch``: None (ruled out), a thread, or a list of threads (a value that may follow
    several schemas began)."""
    stack, mode, sub, ws, node = thread
    if mode == _STRING:  # a string with no rule on its content: only JSON's
        if sub == 0:
            if ch == '"':
                return _ended(stack)
            if ch == "\\":
                return stack, _STRING, -1, 0, None
            return None if ch < " " else thread
        if sub == -1:
            return None if ch not in _ESCAPES else (stack, _STRING, 4 if ch == "u" else 0, 0, None)
        return None if ch not in _HEX else (stack, _STRING, sub - 1, 0, None)
    if mode == _KEY or mode == _CSTRING:
        return _string_step(stack, mode, sub, node, ch)
    if mode == _PSTRING:
        return _pattern_step(stack, sub, node, ch)
    if mode == _NUMBER:
        state, integer = sub
        nxt = _number_step(state, ch, integer)
        if nxt is not None:
            return stack, _NUMBER, (nxt, integer), 0, None
        if state not in _NUMBER_ENDS or stack is None:
            return None
        return _after(stack, ch)  # the number ended: ch is what follows it
    if mode == _RNUMBER:
        state, text = sub
        nxt = _number_step(state, ch, "integer" in node.types, exponent=False)
        if nxt is not None:
            return (stack, _RNUMBER, (nxt, text + ch), 0, node) if node.range.viable(text + ch) else None
        if state not in _NUMBER_ENDS or stack is None or not node.range.holds(text):
            return None
        return _after(stack, ch)
    if mode == _LITERAL:
        if ch != sub[0]:
            return None
        return _ended(stack) if len(sub) == 1 else (stack, _LITERAL, sub[1:], 0, None)
    if mode == _ENUM:
        typed, options = sub
        grown = typed + ch
        left = tuple(o for o in options if o.startswith(grown))
        if left:
            return _ended(stack) if left == (grown,) else (stack, _ENUM, (grown, left), 0, None)
        if typed not in options or stack is None:
            return None
        return _after(stack, ch)  # the value ended: ch is what follows it
    if ch in _WS:
        if mode == _DONE or ws < 0 or ws >= MAX_WHITESPACE:
            return None
        return stack, mode, sub, ws + 1, node
    if mode == _VALUE:
        return _start(stack, node, ch)
    if mode == _AFTER:
        return _after(stack, ch)
    if mode == _COLON:
        return (stack, _VALUE, None, 0, node) if ch == ":" else None
    if mode == _OBJ_FIRST or mode == _OBJ_KEY:
        obj, used = stack[1], stack[2]
        if ch == '"':
            return (stack, _KEY, _STR_KEY, 0, None) if _key_left(obj, used) else None
        if ch == "}" and mode == _OBJ_FIRST and obj.required <= used:
            return _ended(stack[3])
        return None
    if mode == _ARR_FIRST:
        array = stack[1]
        if ch == "]":
            return _ended(stack[3]) if array.min_items == 0 else None
        if array.max_items < 1:
            return None
        return _start(("[", array, 1, stack[3]), array.item(0), ch)
    return None  # _DONE: nothing may follow the root value


def _key_left(obj: Node, used: frozenset) -> bool:
    """Whether another key may be written in an object."""
    return obj.extra is not None or any(k not in used for k in obj.keys)


def _after(stack, ch: str):
    """After a value inside a container: whitespace, a separator or the container's end."""
    if ch in _WS:
        return stack, _AFTER, None, 1, None
    kind, container, info, parent = stack
    if ch == ",":
        if kind == "{":
            return (stack, _OBJ_KEY, None, 0, None) if _key_left(container, info) else None
        if info >= container.max_items:
            return None
        return (kind, container, info + 1, parent), _VALUE, None, 0, container.item(info)
    if kind == "{":
        return _ended(parent) if ch == "}" and container.required <= info else None
    return _ended(parent) if ch == "]" and info >= container.min_items else None


def _start(stack, node: Node, ch: str):
    """The threads of a value of schema ``node`` whose first character is ``ch``."""
    leaves = node.leaves
    if len(leaves) == 1:
        return _start_leaf(stack, leaves[0], ch)
    out = []
    for leaf in leaves:
        thread = _start_leaf(stack, leaf, ch)
        if thread is not None:
            out.append(thread)
    return out or None


def _start_leaf(stack, leaf: Node, ch: str):
    if leaf.literals:
        options = tuple(o for o in leaf.literals if o.startswith(ch))
        if options:
            return _ended(stack) if options == (ch,) else (stack, _ENUM, (ch, options), 0, None)
    types = leaf.types
    if ch == '"':
        if leaf.strings is not None:
            return stack, _CSTRING, _STR_KEY, 0, leaf
        if "string" not in types:
            return None
        if leaf.pattern is not None:
            return stack, _PSTRING, (0, 0, 0, leaf.pattern.start), 0, leaf
        if leaf.min_length or leaf.max_length != float("inf"):
            return stack, _CSTRING, _STR_VALUE, 0, leaf
        return stack, _STRING, 0, 0, None
    if ch == "{":
        return (("{", leaf, frozenset(), stack), _OBJ_FIRST, None, 0, None) if "object" in types else None
    if ch == "[":
        return (("[", leaf, 0, stack), _ARR_FIRST, None, 0, None) if "array" in types else None
    if ch == "-" or ch in _DIGITS:
        if "number" not in types and "integer" not in types:
            return None
        if leaf.range is not None:
            return (stack, _RNUMBER, (_MINUS if ch == "-" else _ZERO if ch == "0" else _INT, ch), 0, leaf) \
                if leaf.range.viable(ch) else None
        return stack, _NUMBER, (_MINUS if ch == "-" else _ZERO if ch == "0" else _INT, "integer" in types), 0, None
    if ch in _LITERALS and _LITERAL_TYPES[ch] in types:
        return stack, _LITERAL, _LITERALS[ch], 0, None
    return None


def _string_step(stack, mode: int, sub: tuple, node: Node | None, ch: str):
    """A key (``_KEY``) or a string whose content is checked (``_CSTRING``) after ``ch``."""
    escape, code, high, length, text = sub
    if escape == 0:
        if ch == '"':
            if mode == _CSTRING:
                if length < node.min_length or (node.strings is not None and text not in node.strings):
                    return None
                return _ended(stack)
            kind, obj, used, parent = stack
            value = obj.properties.get(text, obj.extra)
            if text in used or value is None or not value.leaves:
                return None
            return (kind, obj, used | {text}, parent), _COLON, None, 0, value
        if ch == "\\":
            return (stack, mode, (-1, 0, high, length, text), 0, node) if _escape_ok(stack, mode, node, sub, 0, 0) \
                else None
        if ch < " ":
            return None
        return _add(stack, mode, node, high, length, text, ch)
    if escape == -1:
        if ch not in _ESCAPES or (ch == "/" and _candidates(stack, mode, node) is not None):
            return None
        if ch == "u":
            return stack, mode, (4, 0, high, length, text), 0, node
        return _add(stack, mode, node, high, length, text, _ESCAPES[ch])
    if ch not in _HEX:
        return None
    code = code * 16 + int(ch, 16)
    if not _escape_ok(stack, mode, node, sub, code, 5 - escape):
        return None
    if escape > 1:
        return stack, mode, (escape - 1, code, high, length, text), 0, node
    return _add(stack, mode, node, high, length, text, chr(code))


def _candidates(stack, mode: int, node: Node | None):
    """The strings a checked string may still become (an enum's, a closed object's unused keys); None: any."""
    if mode == _CSTRING:
        return node.strings
    obj, used = stack[1], stack[2]
    return None if obj.extra is not None else [k for k in obj.keys if k not in used]


def _escape_ok(stack, mode: int, node: Node | None, sub: tuple, code: int, digits: int) -> bool:
    """Whether a ``\\u`` escape whose first ``digits`` hex digits spell ``code`` can still give a character that
    the string's rules allow next (checked as the digits come, so that no escape is begun that cannot end).

    A string that must be one of given strings (an enum's, a closed object's keys) is written as JSON writers
    write it: only characters ``json.dumps`` may escape (quote, backslash, control and non-ASCII characters)
    come escaped, so a model cannot spend its tokens spelling ``"a"`` as ``"\\u0061"``."""
    _, _, high, length, text = sub
    candidates = _candidates(stack, mode, node)
    if candidates is None:
        if mode == _CSTRING and length >= node.max_length:
            if not high:
                return False
            units = range(0xDC00, 0xE000)  # only a low surrogate, pairing with the high one, adds nothing
        else:
            return True
    else:
        units = set()
        if high:  # a pair's second half: the low surrogate of a candidate's next character
            base = text[:-1]
            for s in candidates:
                if len(s) > len(base) and s.startswith(base) and ord(s[len(base)]) > 0xFFFF:
                    pair = s[len(base)].encode("utf-16-be")
                    if pair[:2] == text[-1].encode("utf-16-be", "surrogatepass"):
                        units.add(int.from_bytes(pair[2:], "big"))
        for s in candidates:  # a character of its own (or, beyond the BMP, the first half of its pair)
            if len(s) > len(text) and s.startswith(text):
                unit = int.from_bytes(s[len(text)].encode("utf-16-be")[:2], "big")
                if unit < 0x20 or unit == 0x22 or unit == 0x5C or unit >= 0x7F:
                    units.add(unit)
        if mode == _CSTRING and length >= node.max_length:
            units = {u for u in units if 0xDC00 <= u < 0xE000}
    shift = 4 * (4 - digits)
    return any(unit >> shift == code for unit in units)


def _add(stack, mode: int, node: Node | None, high: bool, length: int, text: str | None, char: str):
    """A string's state after one more decoded character (a \\u surrogate pair is one code point)."""
    pair = high and "\udc00" <= char <= "\udfff"
    if not pair:
        length += 1
    if text is not None:
        text = text[:-1] + (text[-1] + char).encode("utf-16", "surrogatepass").decode("utf-16") if pair \
            else text + char
    high = not pair and "\ud800" <= char <= "\udbff"
    if mode == _CSTRING:
        if length > node.max_length:
            return None
        if node.strings is not None and not high and not any(s.startswith(text) for s in node.strings):
            return None
    else:
        obj, used = stack[1], stack[2]
        if obj.extra is None and not high and not any(k.startswith(text) for k in obj.keys if k not in used):
            return None
    return stack, mode, (0, 0, high, length, text), 0, node


def _pattern_step(stack, sub: tuple, node: Node, ch: str):
    """A string under a pattern after ``ch``: its decoded characters step the pattern's automaton, and a ``\\u``
    escape's digits are checked as they come (a surrogate pair is one character; a lone surrogate, which no
    well-formed string holds, is not written)."""
    escape, code, high, states = sub
    regex = node.pattern
    if escape == 0:
        if ch == '"':
            return _ended(stack) if not high and regex.accepts(states) else None
        if ch == "\\":  # any character may be escaped: some must continue the match
            return (stack, _PSTRING, (-1, 0, high, states), 0, node) if _units_ok(regex, states, high, 0, 0xFFFF) \
                else None
        if ch < " " or high or "\ud800" <= ch <= "\udfff":
            return None
        return _pattern_char(stack, node, states, ord(ch))
    if escape == -1:
        if ch not in _ESCAPES or (high and ch != "u"):
            return None
        if ch == "u":
            return (stack, _PSTRING, (4, 0, high, states), 0, node) if _units_ok(regex, states, high, 0, 0xFFFF) \
                else None
        return _pattern_char(stack, node, states, ord(_ESCAPES[ch]))
    if ch not in _HEX:
        return None
    code = code * 16 + int(ch, 16)
    shift = 4 * (escape - 1)
    if not _units_ok(regex, states, high, code << shift, ((code + 1) << shift) - 1):
        return None
    if escape > 1:
        return stack, _PSTRING, (escape - 1, code, high, states), 0, node
    if high:
        return _pattern_char(stack, node, states, 0x10000 + ((high - 0xD800) << 10) + code - 0xDC00)
    if 0xD800 <= code <= 0xDBFF:
        return stack, _PSTRING, (0, 0, code, states), 0, node
    return _pattern_char(stack, node, states, code)


def _units_ok(regex, states, high: int, low: int, top: int) -> bool:
    """Whether some UTF-16 unit in ``low..top`` (the values a \\u escape's digits so far allow) continues a
    matching string: after a high surrogate only its low half, else a character of its own or a pair's high half."""
    if high:
        a, b = max(low, 0xDC00), min(top, 0xDFFF)
        base = 0x10000 + ((high - 0xD800) << 10) - 0xDC00
        return a <= b and regex.any_in(states, base + a, base + b)
    spans = [(max(low, a), min(top, b)) for a, b in ((0, 0xD7FF), (0xE000, 0xFFFF))]
    a, b = max(low, 0xD800), min(top, 0xDBFF)
    if a <= b:
        spans.append((0x10000 + ((a - 0xD800) << 10), 0x10000 + ((b - 0xD800) << 10) + 0x3FF))
    return any(a <= b and regex.any_in(states, a, b) for a, b in spans)


def _pattern_char(stack, node: Node, states, code: int):
    states = node.pattern.step(states, code)
    return (stack, _PSTRING, (0, 0, 0, states), 0, node) if states else None


def _number_step(state: int, ch: str, integer: bool, exponent: bool = True) -> int | None:
    """The number state after ``ch``, or None when ``ch`` cannot continue the number (``integer``: no fraction
    and no exponent; not ``exponent``: none)."""
    digit = ch in _DIGITS
    if state == _MINUS:
        return (_ZERO if ch == "0" else _INT) if digit else None
    if state in (_ZERO, _INT):
        if digit and state == _INT:
            return _INT
        if integer:
            return None
        return _DOT if ch == "." else _EXP if ch in "eE" and exponent else None
    if state in (_DOT, _FRAC):
        if digit:
            return _FRAC
        return _EXP if state == _FRAC and ch in "eE" and exponent else None
    if state == _EXP:
        return _EXP_DIGITS if digit else _EXP_SIGN if ch in "+-" else None
    return _EXP_DIGITS if digit else None  # _EXP_SIGN, _EXP_DIGITS
