"""JSON Schema ``pattern`` s compiled into automata that check a string prefix exactly.

A pattern is compiled once into a Thompson NFA over code points; a string being decoded
carries the set of NFA states its characters lead to (:meth:`Regex.step`), so a prefix is
checked in the time its own characters take. States from which no accepting state can be
reached are pruned at compile time, and characters JSON cannot carry in a well-formed string
(lone surrogates) are left out of every class, so a non-empty state set always has a
completion: decoding never reaches a prefix no matching string extends.

The subset enforced is what schemas commonly use, where ECMA-262 (which JSON Schema names)
and Python's ``re`` agree: literals and escapes (``\\t \\n \\r \\f \\v \\0 \\xHH \\uHHHH``,
escaped punctuation), ``.`` (not a line terminator), ``\\d \\w \\s`` and their negations
(ECMA's meaning: ``\\d`` and ``\\w`` are ASCII), classes ``[a-z_]`` and ``[^...]``, groups
``(...)``, ``(?:...)``, ``(?<name>...)``, alternation, the quantifiers ``* + ? {n} {n,}
{n,m}`` (lazy or not: the language is the same) and the anchors ``^``/``$``. A pattern is
unanchored, as JSON Schema says (it matches if it matches anywhere, like ``re.search``).
Anything else (lookaround, backreferences, ``\\b``, ``\\p{...}``, ``[]``, ``{,n}``, which the two
dialects read differently or which no NFA checks) raises :class:`PatternError`.
"""

from __future__ import annotations

from bisect import bisect_right

MAX_STATES = 20_000  # NFA states a pattern may expand to (a quantifier copies its operand)
MAX_NESTING = 64  # groups inside groups (parsing and building recurse once a level)
_TOP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code point ranges


class PatternError(ValueError):
    """The pattern is outside the enforced subset (the message says what)."""


def _normal(ranges) -> Ranges:
    """Sorted, merged, without surrogates (which no well-formed string holds)."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, _SURROGATES[0] - 1)), (max(lo, _SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def _complement(ranges: Ranges) -> Ranges:
    out, at = [], 0
    for lo, hi in ranges:
        if lo > at:
            out.append((at, lo - 1))
        at = hi + 1
    if at <= _TOP:
        out.append((at, _TOP))
    return _normal(out)


_DIGIT = _normal([(48, 57)])
_WORD = _normal([(48, 57), (65, 90), (95, 95), (97, 122)])
_SPACE = _normal([(9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                  (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)])
_CLASS_ESCAPES = {"d": _DIGIT, "D": _complement(_DIGIT), "w": _WORD, "W": _complement(_WORD), "s": _SPACE,
                  "S": _complement(_SPACE)}
_CONTROL_ESCAPES = {"t": 9, "n": 10, "v": 11, "f": 12, "r": 13}
_DOT = _complement(_normal([(10, 10), (13, 13), (0x2028, 0x2029)]))
ANY_CHAR = _normal([(0, _TOP)])


class _Parser:
    """Pattern text -> syntax tree: ("set", ranges), ("cat", [...]), ("alt", [...]), ("rep", node, min, max),
    ("bol",), ("eol",)."""

    def __init__(self, source: str) -> None:
        self.s, self.i, self.depth = source, 0, 0

    def fail(self, what: str, at: int | None = None) -> PatternError:
        return PatternError(f"{what} at offset {self.i if at is None else at} of {self.s!r}")

    def peek(self, n: int = 1) -> str:
        return self.s[self.i:self.i + n]

    def parse(self):
        tree = self.alternation()
        if self.i < len(self.s):
            raise self.fail("an unmatched ')'")
        return tree

    def alternation(self):
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self):
        items = []
        while self.i < len(self.s) and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return ("cat", items)

    def quantified(self, atom):
        ch = self.peek()
        bounds = None
        if ch in ("*", "+", "?"):
            self.i += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        elif ch == "{":
            bounds = self.braces()
        if bounds is None:
            return atom
        if atom[0] in ("bol", "eol"):
            raise self.fail("a quantified anchor")
        if self.peek() == "?":
            self.i += 1  # lazy: the same strings match
        if self.peek() and self.peek() in "*+?" or self.braces(probe=True):
            raise self.fail("a quantifier after a quantifier")
        return ("rep", atom, bounds[0], bounds[1])

    def braces(self, probe: bool = False):
        """``{n}``, ``{n,}`` or ``{n,m}`` at the cursor (consumed unless probing), else None (a literal brace)."""
        j = self.i + 1
        end = self.s.find("}", j)
        if self.peek() != "{" or end < 0:
            return None
        body = self.s[j:end]
        low, comma, high = body.partition(",")
        if not low.isdigit() or not low.isascii():
            if comma and not low and (not high or high.isdigit()):
                raise self.fail("'{,n}' or '{,}' (a literal in ECMA-262, a quantifier in Python)")
            return None
        if high and (not high.isdigit() or not high.isascii()):
            return None
        if probe:
            return True
        self.i = end + 1
        lo, hi = int(low), (int(high) if high else None) if comma else int(low)
        if hi is not None and hi < lo:
            raise self.fail(f"a quantifier {{{body}}} whose maximum is below its minimum")
        return lo, hi

    def atom(self):
        ch = self.peek()
        self.i += 1
        if ch == "(":
            if self.peek() == "?":
                if self.peek(2) == "?:":
                    self.i += 1
                elif self.peek(2) == "?<" and self.peek(3) not in ("?<=", "?<!"):
                    end = self.s.find(">", self.i)
                    name = self.s[self.i + 2:end] if end > 0 else ""
                    if not name.isidentifier():
                        raise self.fail("a malformed group name")
                    self.i = end
                else:
                    raise self.fail("a lookaround or group flag", self.i - 1)
                self.i += 1
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.fail(f"groups nested more than {MAX_NESTING} deep")
            inner = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.fail("an unclosed group")
            self.i += 1
            return inner
        if ch == "[":
            return ("set", self.char_class())
        if ch == ".":
            return ("set", _DOT)
        if ch == "^":
            return ("bol",)
        if ch == "$":
            return ("eol",)
        if ch == "\\":
            return ("set", self.escape(in_class=False))
        if ch in "*+?":
            raise self.fail("nothing to repeat")
        if ch == "{" and self.braces_at(self.i - 1):
            raise self.fail("nothing to repeat")
        return ("set", _normal([(ord(ch), ord(ch))]))

    def braces_at(self, at: int) -> bool:
        keep, self.i = self.i, at
        try:
            return bool(self.braces(probe=True))
        finally:
            self.i = keep

    def escape(self, in_class: bool) -> Ranges:
        if self.i >= len(self.s):
            raise self.fail("a trailing backslash")
        ch = self.peek()
        self.i += 1
        start = self.i - 2
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch in _CONTROL_ESCAPES:
            code = _CONTROL_ESCAPES[ch]
        elif ch == "b" and in_class:
            code = 8
        elif ch == "0" and not self.peek().isdigit():
            code = 0
        elif ch in "xu":
            n = 2 if ch == "x" else 4
            digits = self.peek(n)
            if len(digits) != n or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise self.fail(f"a malformed \\{ch} escape", start)
            self.i += n
            code = int(digits, 16)
            if _SURROGATES[0] <= code <= _SURROGATES[1]:
                raise self.fail("a surrogate escape (a UTF-16 unit in ECMA-262, a code point in Python)", start)
        elif ch.isascii() and ch.isalnum():
            raise self.fail(f"the escape \\{ch} (a backreference, boundary or property, or one the dialects "
                            "read differently)", start)
        else:
            code = ord(ch)
        return _normal([(code, code)])

    def char_class(self) -> Ranges:
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        if self.peek() == "]":
            raise self.fail("'[]' or '[^]' (an empty class in ECMA-262, a literal ']' in Python)")
        ranges: list[tuple[int, int]] = []
        while True:
            if self.i >= len(self.s):
                raise self.fail("an unclosed character class")
            if self.peek() == "]":
                self.i += 1
                break
            low = self.class_atom()
            if self.peek() == "-" and self.peek(2) != "-]" and self.s[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                high = self.class_atom()
                if len(low) != 1 or len(high) != 1 or low[0][0] != low[0][1] or high[0][0] != high[0][1]:
                    raise self.fail("a range with a class escape at an end")
                if high[0][0] < low[0][0]:
                    raise self.fail("a range out of order")
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges.extend(low)
        out = _normal(ranges)
        return _complement(out) if negate else out

    def class_atom(self) -> Ranges:
        ch = self.peek()
        self.i += 1
        if ch == "\\":
            return self.escape(in_class=True)
        return ((ord(ch), ord(ch)),)


class Regex:
    """A compiled pattern; state sets are frozensets of NFA items (state * 2 + whether ``$`` was passed)."""

    def __init__(self, source: str, anchored: bool = False) -> None:
        """``anchored``: the whole string must match (else, as JSON Schema, a match anywhere counts)."""
        tree = _Parser(source).parse()
        if not anchored:
            anywhere = ("rep", ("set", ANY_CHAR), 0, None)
            tree = ("cat", [anywhere, tree, anywhere])
        self.source = source
        self.eps: list[list[int]] = []
        self.eol: list[list[int]] = []
        self.bol: list[list[int]] = []
        self.chars: list[list[tuple[Ranges, int]]] = []
        begin, self.accept = self.build(tree)
        self.live = self.reaching_accept()
        self.closures = {}
        self.start = self.closure([begin * 2], at_start=True)

    # -- construction --

    def state(self) -> int:
        if len(self.eps) >= MAX_STATES:
            raise PatternError(f"the pattern {self.source!r} expands to more than {MAX_STATES} automaton states")
        for table in (self.eps, self.eol, self.bol, self.chars):
            table.append([])
        return len(self.eps) - 1

    def build(self, tree) -> tuple[int, int]:
        kind = tree[0]
        a = self.state()
        if kind == "set":
            b = self.state()
            if tree[1]:
                self.chars[a].append((tree[1], b))
            return a, b
        if kind in ("bol", "eol"):
            b = self.state()
            (self.bol if kind == "bol" else self.eol)[a].append(b)
            return a, b
        if kind == "cat":
            at = a
            for item in tree[1]:
                s, e = self.build(item)
                self.eps[at].append(s)
                at = e
            return a, at
        if kind == "alt":
            b = self.state()
            for item in tree[1]:
                s, e = self.build(item)
                self.eps[a].append(s)
                self.eps[e].append(b)
            return a, b
        _, inner, low, high = tree
        at = a
        for _ in range(low):
            s, e = self.build(inner)
            self.eps[at].append(s)
            at = e
        b = self.state()
        self.eps[at].append(b)
        if high is None:
            s, e = self.build(inner)
            self.eps[at].append(s)
            self.eps[e].append(at)
        else:
            for _ in range(high - low):
                s, e = self.build(inner)
                self.eps[at].append(s)
                self.eps[e].append(b)
                at = e
        return a, b

    def reaching_accept(self) -> frozenset[int]:
        """The items from which the accepting state can be reached past position 0 (no ``^``)."""
        back: dict[int, list[int]] = {}
        for s in range(len(self.eps)):
            for e in (0, 1):
                for t in self.eps[s]:
                    back.setdefault(t * 2 + e, []).append(s * 2 + e)
                for t in self.eol[s]:
                    back.setdefault(t * 2 + 1, []).append(s * 2 + e)
            for _, t in self.chars[s]:
                back.setdefault(t * 2, []).append(s * 2)
        seen = {self.accept * 2, self.accept * 2 + 1}
        todo = list(seen)
        while todo:
            for prev in back.get(todo.pop(), ()):
                if prev not in seen:
                    seen.add(prev)
                    todo.append(prev)
        return frozenset(seen)

    def closure(self, items, at_start: bool = False) -> frozenset[int]:
        """The live items reachable from ``items`` without reading a character."""
        seen, todo = set(items), list(items)
        while todo:
            item = todo.pop()
            s, ended = divmod(item, 2)
            nxt = [t * 2 + ended for t in self.eps[s]] + [t * 2 + 1 for t in self.eol[s]]
            if at_start:
                nxt += [t * 2 + ended for t in self.bol[s]]
            for n in nxt:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return frozenset(seen & self.live)

    def target(self, state: int) -> frozenset[int]:
        out = self.closures.get(state)
        if out is None:
            out = self.closures[state] = self.closure([state * 2])
        return out

    # -- reading --

    def step(self, states: frozenset[int], code: int) -> frozenset[int]:
        """The states after the character ``code`` (empty: no matching string goes on this way)."""
        out: set[int] = set()
        for item in states:
            if item & 1:
                continue
            for ranges, t in self.chars[item >> 1]:
                k = bisect_right(ranges, (code, _TOP + 1)) - 1
                if k >= 0 and ranges[k][0] <= code <= ranges[k][1]:
                    out |= self.target(t)
        return frozenset(out)

    def any_in(self, states: frozenset[int], low: int, high: int) -> bool:
        """Whether some character in ``low..high`` leads on to a match."""
        for item in states:
            if item & 1:
                continue
            for ranges, t in self.chars[item >> 1]:
                if self.target(t) and any(a <= high and low <= b for a, b in ranges):
                    return True
        return False

    def accepts(self, states: frozenset[int]) -> bool:
        return self.accept * 2 in states or self.accept * 2 + 1 in states

    def matches(self, text: str) -> bool:
        """Whether the whole ``text`` is accepted (for enum values, checked once)."""
        states = self.start
        for ch in text:
            if not states:
                return False
            states = self.step(states, ord(ch))
        return self.accepts(states)
