"""``pattern``, ``format`` and numeric bounds, enforced exactly on every prefix of a string or number.

Oracles: Python's ``re`` (``re.search`` with ASCII classes, ``$`` as ``\\Z``: ECMA-262's meaning),
the standard library's ``datetime``/``ipaddress``/``uuid`` plus shape checks written from the
RFCs for formats, and exact decimal arithmetic (``fractions``) for numbers. For each:

- a whole value is accepted as complete exactly when the oracle says it is valid;
- every prefix of a valid value is accepted;
- random walks that take any accepted character never reach a dead end (every accepted
  prefix has a completion), and what they complete is valid.
"""

from __future__ import annotations

import calendar
import ipaddress
import json
import random
import re
import uuid
from fractions import Fraction

import pytest

from qlora.infer.json_prefix import JsonPrefix
from qlora.infer.json_schema import SchemaError, compile_schema
from qlora.infer.regex import PatternError, Regex
from qlora.infer.string_formats import FORMATS

PATTERNS = [
    r"^[a-z]+$", r"ab", r"^a|b$", r"^(?:ab|a)*c?$", r"x{2,3}", r"^\d{3}-\d{2,}$", r"^[^a\d]*$", r"^.?\.b$",
    r"^(a|)+b{0,2}$", r"^\w+@\w+\.[a-z]{2,3}$", r"\s", r"^[\-a_]+?$", r"^$", r"[\\/]", r"^(?<x>ab)+$", r"^\S\D\W$",
    r"é|^\u00e9{2}$", r"^[é-ü]$", r"a{0}b", r"^(a*)*$", r"^\t\x41[\b]?$", r"^\0?$", r"^[a-c]{2}(?:-[0-9]+)?$",
]
ALPHABET = "abcx0129-_.@ \té\t\x08Aü/\\"
WALK_TOKENS = list(ALPHABET.replace("\\", "")) + ['"', "\\\\", "\\/", "\\t", "\\b", "\\u00e9", "\\u0041",
                                                  "\\ud83d\\ude00", "\\u0000", "\\", "\\u", "\\u00", "\\ud8"]


_PRINTABLE = [chr(c) for c in range(32, 127)]  # what a walk falls back on (an escape's next hex digit, ...)


def _search(pattern: str, text: str) -> bool:
    python = pattern.replace("$", r"\Z").replace("(?<", "(?P<")  # Python before 3.12 names groups (?P<...>)
    return re.search(python, text, re.ASCII) is not None


def _feed(state: JsonPrefix | None, text: str) -> JsonPrefix | None:
    for ch in text:
        if state is None:
            return None
        state = state.feed(ch)
    return state


def _complete(root, text: str) -> bool:
    state = _feed(JsonPrefix.start(root), text)
    return state is not None and state.complete


def _every_prefix_accepted(root, text: str) -> bool:
    state = JsonPrefix.start(root)
    for ch in text:
        state = state.feed(ch)
        if state is None:
            return False
    return True


def _walk(root, rng: random.Random, tokens: list[str], limit: int = 60) -> str | None:
    """A random walk over accepted tokens; the text once complete (None: still open at ``limit``)."""
    state, text = JsonPrefix.start(root), ""
    while len(text) < limit:
        options = [t for t in tokens if state.accepts(t)] or [c for c in _PRINTABLE if state.accepts(c)]
        assert options or state.complete, f"dead end after {text!r}"
        if state.complete and (not options or rng.random() < 0.5):
            return text
        token = rng.choice(options)
        state, text = state.feed(token), text + token
    return text if state.complete else None


def _strings(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(count)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_as_re_search_on_every_prefix(pattern):
    rng = random.Random(pattern)
    root = compile_schema({"type": "string", "pattern": pattern}).root
    assert compile_schema({"type": "string", "pattern": pattern}).unenforced == ()
    found = set()
    for _ in range(40):
        text = _walk(root, rng, WALK_TOKENS)
        if text is not None:
            value = json.loads(text)
            assert _search(pattern, value), (text, value)
            found.add(value)
    candidates = _strings(rng, 300) + list(found)
    candidates += [s[:i] + c + s[i + 1:] for s in found for i in rng.sample(range(len(s)), min(4, len(s)))
                   for c in "a9 é"]
    for value in candidates:
        valid = _search(pattern, value)
        for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
            assert _complete(root, text) == valid, (pattern, text)
            if valid:
                assert _every_prefix_accepted(root, text)


def test_strings_under_a_pattern_read_escapes_and_surrogate_pairs_as_characters():
    root = compile_schema({"type": "string", "pattern": "^[😀-😂]a$"}).root
    assert _complete(root, '"\\ud83d\\ude00\\u0061"') and _complete(root, '"😁a"')
    start = JsonPrefix.start(root)
    assert start.feed('"\\ud83d') is not None and start.feed('"\\ud83c') is None  # no pair of it is allowed
    assert start.feed('"\\ud83d\\u0') is None  # a high surrogate waits for its low half only
    assert start.feed('"\\ud83d"') is None and start.feed('"\\u00') is None  # only a pair's high half starts it
    assert start.feed('"\\ud83d\\ude03') is None
    digits = compile_schema({"type": "string", "pattern": r"^\d$"}).root
    assert JsonPrefix.start(digits).feed('"\\u003') is not None and JsonPrefix.start(digits).feed('"\\u004') is None
    assert JsonPrefix.start(digits).feed('"\\n') is None and _complete(digits, '"\\u0037"')


def test_patterns_outside_the_subset_are_named_not_guessed():
    for pattern in (r"a(?=b)", r"(?<!a)b", r"(a)\1", r"\bword", r"\p{L}", r"[]a]", r"[^]", r"a{,3}", r"a{,}",
                    r"\ud800", r"[\d-z]", "(" * 500 + ")" * 500, "(?:a{100}){300}"):  # valid ECMA-262, not decoded
        with pytest.raises(PatternError):
            Regex(pattern)
        problems = compile_schema({"type": "string", "pattern": pattern}).unenforced
        assert len(problems) == 1 and problems[0].startswith("pattern ("), problems
    for pattern in (r"a**", r"(a", r"a)", r"[a", r"[z-a]", r"*a", "a{3,2}", "\\"):  # no regular expression at all
        with pytest.raises(PatternError):
            Regex(pattern)
        with pytest.raises(SchemaError, match=r"not a valid JSON Schema: properties\.s\.pattern: .* is not a regular"):
            compile_schema({"type": "object", "properties": {"s": {"type": "string", "pattern": pattern}}})
    assert Regex("a{,").matches("xa{,") and Regex("x{y}").matches("x{y}")  # braces that are no quantifier
    assert compile_schema({"type": "integer", "format": "int32", "pattern": "(?=x)"}).unenforced == ()  # strings only
    assert compile_schema({"type": "string", "minimum": "x"}).unenforced == ()  # numbers only


def test_patterns_no_string_matches_make_the_string_unsatisfiable():
    with pytest.raises(SchemaError, match="matches no string"):
        compile_schema({"type": "string", "pattern": r"[^\s\S]"})
    with pytest.raises(SchemaError, match="matches no string"):
        compile_schema({"type": "string", "pattern": r"a$b"})
    pruned = compile_schema({"type": ["string", "null"], "pattern": "a^"}).root  # the string branch is pruned
    assert JsonPrefix.start(pruned).feed('"') is None and _complete(pruned, "null")
    assert _complete(compile_schema({"enum": ["ab", "cd", 3], "pattern": "^c"}).root, '"cd"')
    assert not _complete(compile_schema({"enum": ["ab", "cd", 3], "pattern": "^c"}).root, '"ab"')


# -- formats: oracles from the standard library and the RFCs' shapes --

def _date_ok(s: str) -> bool:
    m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", s, re.ASCII)
    if not m:
        return False
    y, mo, d = map(int, m.groups())
    days = [31, 29 if calendar.isleap(y) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return 1 <= mo <= 12 and 1 <= d <= days[mo - 1]


def _time_ok(s: str) -> bool:
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?(?:[Zz]|[+-](\d\d):(\d\d))", s, re.ASCII)
    if not m:
        return False
    h, mi, sec = int(m[1]), int(m[2]), int(m[3])
    return h <= 23 and mi <= 59 and sec <= 60 and (m[5] is None or (int(m[5]) <= 23 and int(m[6]) <= 59))


def _duration_ok(s: str) -> bool:
    m = re.fullmatch(r"P(\d+Y)?(\d+M)?(\d+D)?(?:T(\d+H)?(\d+M)?(\d+S)?)?", s, re.ASCII)
    if re.fullmatch(r"P\d+W", s, re.ASCII):
        return True
    return bool(m) and any(m.groups()) and ("T" not in s or any(m.groups()[3:]))


def _ip_ok(kind, s: str) -> bool:
    try:
        kind(s)
    except ValueError:
        return False
    return s.isascii() and "%" not in s


def _hostname_ok(s: str) -> bool:
    return all(re.fullmatch(r"[A-Za-z0-9-]{1,63}", label, re.ASCII) and label[0] != "-" and label[-1] != "-"
               for label in s.split("."))


def _email_ok(s: str) -> bool:
    atext = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    for at in [i for i, c in enumerate(s) if c == "@"]:
        local, domain = s[:at], s[at + 1:]
        dotted = all(re.fullmatch(atext, part, re.ASCII) for part in local.split("."))
        quoted = re.fullmatch(r'"(?:[ !#-\[\]-~]|\\[ -~])*"', local) is not None
        if not (dotted or quoted):
            continue
        if domain.startswith("[") and domain.endswith("]"):
            inner = domain[1:-1]
            if _ip_ok(ipaddress.IPv4Address, inner) or (inner.startswith("IPv6:") and
                                                         _ip_ok(ipaddress.IPv6Address, inner[5:])):
                return True
            tag, colon, content = inner.partition(":")
            if colon and re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]", tag) and re.fullmatch(r"[!-Z^-~]+", content):
                return True
        elif all(re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", p, re.ASCII) for p in domain.split(".")):
            return True
    return False


def _uuid_ok(s: str) -> bool:
    return bool(re.fullmatch(r"[0-9a-fA-F-]{36}", s)) and [i for i, c in enumerate(s) if c == "-"] == [8, 13, 18, 23] \
        and uuid.UUID(s) is not None


ORACLES = {
    "date": _date_ok, "time": _time_ok, "date-time": lambda s: len(s) > 10 and s[10] in "Tt" and _date_ok(s[:10])
    and _time_ok(s[11:]), "duration": _duration_ok, "uuid": _uuid_ok,
    "ipv4": lambda s: _ip_ok(ipaddress.IPv4Address, s), "ipv6": lambda s: _ip_ok(ipaddress.IPv6Address, s),
    "hostname": _hostname_ok, "email": _email_ok,
}


def _valid_examples(fmt: str, rng: random.Random) -> list[str]:
    def date():
        y, m = rng.choice([rng.randint(0, 9999), 1900, 2000, 2024, 2023, 400]), rng.randint(1, 12)
        return f"{y:04d}-{m:02d}-{rng.choice([1, 28, 29, 30, 31]):02d}"

    def time():
        frac = rng.choice(["", ".5", ".123456"])
        zone = rng.choice(["Z", "z", f"+{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}", "-05:30"])
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 60):02d}{frac}{zone}"

    out = []
    for _ in range(40):
        if fmt == "date":
            out.append(date())
        elif fmt == "time":
            out.append(time())
        elif fmt == "date-time":
            out.append(f"{date()}{rng.choice('Tt')}{time()}")
        elif fmt == "duration":
            parts = [f"{rng.randint(0, 99)}{u}" for u in "YMD" if rng.random() < 0.5]
            times = [f"{rng.randint(0, 99)}{u}" for u in "HMS" if rng.random() < 0.5]
            out.append("P" + "".join(parts) + ("T" + "".join(times) if times else "") if parts or times else "P3W")
        elif fmt == "uuid":
            text = str(uuid.UUID(int=rng.getrandbits(128)))
            out.append(text.upper() if rng.random() < 0.3 else text)
        elif fmt == "ipv4":
            out.append(str(ipaddress.IPv4Address(rng.getrandbits(32) if rng.random() < 0.7 else rng.randint(0, 300))))
        elif fmt == "ipv6":
            words = [rng.choice([0, 0, 1, rng.getrandbits(16)]) for _ in range(8)]
            address = ipaddress.IPv6Address(sum(w << (16 * i) for i, w in enumerate(words)))
            out.append(rng.choice([str(address), address.exploded, f"::ffff:{rng.randint(0, 255)}.1.2.3"]))
        elif fmt == "hostname":
            labels = ["".join(rng.choice("ab-9") for _ in range(rng.randint(1, 5))).strip("-") or "x"
                      for _ in range(rng.randint(1, 3))]
            out.append(".".join(labels))
        else:
            local = rng.choice(["a.b", "x+tag", '"a b\\"c"', "o'neil", "!#"])
            domain = rng.choice(["example.com", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]", "a-b.c9"])
            out.append(f"{local}@{domain}")
    return out


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_formats_accept_exactly_their_rfc_forms(fmt):
    rng = random.Random(fmt)
    root = compile_schema({"type": "string", "format": fmt}).root
    valid = _valid_examples(fmt, rng)
    tokens = [c for c in _PRINTABLE if c != "\\"] + ["\\", "\\u003a", "\\u00"]
    walked = [json.loads(t) for t in (_walk(root, rng, tokens, 100) for _ in range(20)) if t is not None]
    if fmt in ("date", "date-time"):  # the calendar's edges: leap years, month lengths
        days = [f"{y:04d}-{md}" for y in (0, 4, 100, 400, 1800, 1900, 1996, 2000, 2001, 2023, 2024, 2100, 2400, 9996)
                for md in ("02-28", "02-29", "02-30", "04-30", "04-31", "12-31", "13-01", "00-10", "01-00", "01-32")]
        valid += [d + ("T23:59:60.5+01:00" if fmt == "date-time" else "") for d in days]
    edits = "0123456789:-.TZ@aF[]%"
    mutated = [s[:i] + c + s[i + 1:] for s in valid + walked for i in rng.sample(range(len(s)), min(3, len(s)))
               for c in rng.sample(edits, 2)]
    mutated += [s[:i] + s[i + 1:] for s in valid for i in rng.sample(range(len(s)), min(2, len(s)))]
    assert ORACLES[fmt]("") is False
    for value in valid + walked + mutated + [""]:
        expected = ORACLES[fmt](value)
        assert _complete(root, json.dumps(value)) == expected, (fmt, value)
    valid = [v for v in valid if ORACLES[fmt](v)]  # (days may overrun their month)
    assert len(valid) > 25 and len(walked) > 5
    for value in valid:
        assert _every_prefix_accepted(root, json.dumps(value))
    assert compile_schema({"type": "string", "format": fmt}).unenforced == ()


# -- numbers --

def _number_oracle(schema: dict, text: str) -> bool:
    """Whether ``text`` (a JSON number) is valid under ``schema`` and written in the form bounded numbers take."""
    if not re.fullmatch(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?", text):
        return False
    if schema["type"] == "integer" and "." in text:
        return False
    value = Fraction(text)
    bound = lambda key: Fraction(json.dumps(schema[key]))  # noqa: E731
    if "minimum" in schema and value < bound("minimum") or "maximum" in schema and value > bound("maximum"):
        return False
    if "exclusiveMinimum" in schema and value <= bound("exclusiveMinimum"):
        return False
    if "exclusiveMaximum" in schema and value >= bound("exclusiveMaximum"):
        return False
    if "multipleOf" in schema:
        step = bound("multipleOf")
        if (value / step).denominator != 1:
            return False
        if schema["type"] == "number":  # beyond the multiple's own fraction digits, only zeros
            digits = len(json.dumps(schema["multipleOf"]).partition(".")[2])
            if text.partition(".")[2][digits:].strip("0"):
                return False
    return True


def _random_number_schema(rng: random.Random) -> dict:
    schema = {"type": rng.choice(["integer", "number"])}
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if rng.random() < 0.35:
            value = rng.choice([rng.randint(-120, 120), round(rng.uniform(-120, 120), rng.randint(1, 2)), 0])
            schema[key] = abs(value) or 0.5 if key == "multipleOf" else value
    if len(schema) == 1:  # unbounded numbers keep every written form (exponents too): see test_json_schema
        schema["minimum"] = rng.randint(-120, 120)
    return schema


def _number_texts(rng: random.Random) -> list[str]:
    out = ["0", "-0", "0.0", "-0.00", "1e2", "1.5E-1", "00", "01", "-", "1.", ".5"]
    for _ in range(150):
        whole = str(rng.randint(0, rng.choice([9, 150, 10**6])))
        frac = "".join(rng.choice("0123456789") for _ in range(rng.choice([0, 0, 1, 2, 3])))
        out.append(("-" if rng.random() < 0.4 else "") + whole + ("." + frac if frac else ""))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_numeric_bounds_are_exact_on_every_prefix(seed):
    rng = random.Random(seed)
    schema = _random_number_schema(rng)
    try:
        root = compile_schema(schema).root
    except SchemaError:
        empty = not any(_number_oracle(schema, t) for t in _number_texts(rng) + [str(i) for i in range(-130, 131)])
        assert empty and any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
        return
    assert compile_schema(schema).unenforced == ()
    array = compile_schema({"type": "array", "items": schema}).root
    for text in _number_texts(rng):
        valid = _number_oracle(schema, text)
        assert _complete(root, text) == valid, (schema, text)
        assert _complete(array, f"[{text}]") == valid, (schema, text)
        if valid:
            assert _every_prefix_accepted(array, f"[{text}")
    for _ in range(30):  # no dead end, and what completes is valid
        text = _walk(array, rng, list("[-0123456789.,]"), 40)
        if text is not None:
            assert all(_number_oracle(schema, json.dumps(v) if isinstance(v, int) else t)
                       for v, t in zip(json.loads(text), text[1:-1].split(",") if text != "[]" else [])), text


def test_every_accepted_number_prefix_extends_to_a_valid_number():
    """Exhaustively, for small bounds: each accepted prefix (up to 4 characters) has a completion the oracle
    finds valid, within 4 more characters."""

    def completes(schema, state, text, depth) -> bool:
        end = state.feed("]")
        if end is not None and end.complete and _number_oracle(schema, text):
            return True
        return depth > 0 and any(completes(schema, state.feed(c), text + c, depth - 1)
                                 for c in "0123456789." if state.accepts(c))

    for schema in ({"type": "integer", "minimum": 17, "maximum": 23}, {"type": "integer", "minimum": -40,
                                                                       "exclusiveMaximum": -38},
                   {"type": "number", "exclusiveMinimum": 0.25, "maximum": 0.3}, {"type": "number", "minimum": -1.5,
                                                                                  "multipleOf": 0.75, "maximum": 2},
                   {"type": "integer", "minimum": 100, "multipleOf": 7}):
        root = compile_schema({"type": "array", "items": schema}).root
        frontier = [("", JsonPrefix.start(root).feed("["))]
        for _ in range(4):
            frontier = [(p + c, state.feed(c)) for p, state in frontier for c in "-0123456789." if state.accepts(c)]
            for prefix, state in frontier:
                assert completes(schema, state, prefix, 4), (schema, prefix)


def test_unsatisfiable_bounds_raise_and_prune():
    for schema in ({"type": "integer", "minimum": 5, "maximum": 4}, {"type": "integer", "minimum": 4.2, "maximum": 4.8},
                   {"type": "number", "exclusiveMinimum": 3, "maximum": 3},
                   {"type": "integer", "minimum": 1, "maximum": 6, "multipleOf": 7},
                   {"type": "number", "minimum": 0.1, "maximum": 0.2, "multipleOf": 0.3}):
        with pytest.raises(SchemaError, match="allow no"):
            compile_schema({"type": "object", "properties": {"n": schema}, "required": ["n"]})
    pruned = compile_schema({"type": ["integer", "string"], "minimum": 3, "maximum": 2}).root
    assert JsonPrefix.start(pruned).feed("3") is None and _complete(pruned, '"x"')
    assert _complete(compile_schema({"enum": [1, 2.5, 3], "exclusiveMaximum": 2.5}).root, "1")
    assert not _complete(compile_schema({"enum": [1, 2.5, 3], "exclusiveMaximum": 2.5}).root, "2.5")
