"""Rules that meet on one value, enforced together exactly: ``pattern`` beside ``format`` and the length
bounds, draft 4's boolean ``exclusiveMinimum``/``exclusiveMaximum``, and ``oneOf`` claimed exclusive.

Oracles: brute force over every string of a small alphabet (the automaton's accept and prefix-viable
answers against ``re``), Python's ``re`` with the RFC-shaped format checks of test_schema_patterns, and
``jsonschema`` (Draft 4 for the boolean bounds, 2020-12 for ``oneOf``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re

import jsonschema
import pytest

from qlora.infer.json_prefix import JsonPrefix
from qlora.infer.json_schema import SchemaError, compile_schema
from qlora.infer.regex import Regex
from qlora.infer.string_rule import StringRule
from test_schema_patterns import (_PRINTABLE, ORACLES, _complete, _every_prefix_accepted, _number_texts, _search,
                                  _valid_examples, _walk)

ALPHABET = "ab1-"
CLOSED = f"^[{re.escape(ALPHABET)}]*$"  # beside the others, keeps every allowed string within ALPHABET


@pytest.mark.parametrize("patterns, low, high", [
    (["^a+$"], 0, 2), (["^abc"], 0, 2), (["a", "b"], 2, 4), (["^(ab)*$", "^a"], 3, 6), (["1$", "^[ab]"], 0, 5),
    (["^a|b$", "-"], 1, 5), (["^(a|b)*$"], 3, 3), (["^a*-?$", "^.{2,}"], 0, 6), (["(?:ab|1)+", "^[^-]"], 4, 6),
    (["^(?:a-|b)*$", "b"], 2, 6), ([], 2, 3),
])
def test_rules_together_are_exact_on_every_prefix_by_brute_force(patterns, low, high):
    """Every string over ALPHABET up to ``high`` long: accepted iff all patterns match and the length is in
    bounds, and each prefix is still viable iff some allowed string extends it (all are enumerated)."""
    rule = StringRule([Regex(p) for p in patterns + [CLOSED]], low, high, "test")
    texts = [""] + ["".join(t) for n in range(1, high + 1) for t in itertools.product(ALPHABET, repeat=n)]
    allowed = {t for t in texts if low <= len(t) <= high and all(_search(p, t) for p in patterns)}
    prefixes = {t[:i] for t in allowed for i in range(len(t) + 1)}
    for text in texts:
        state = rule.start
        for ch in text:
            state = None if state is None else rule.step(state, ord(ch))
        assert (state is not None) == (text in prefixes), (patterns, low, high, text)
        assert (state is not None and rule.accepts(state)) == (text in allowed), (patterns, low, high, text)
        assert rule.matches(text) == (text in allowed)
        if state is not None:  # a character leads on exactly when some allowed string goes on with it
            assert rule.any_in(state, 0, 0x10FFFF) == any(p.startswith(text) and len(p) > len(text) for p in prefixes)
            for ch in ALPHABET:
                assert rule.any_in(state, ord(ch), ord(ch)) == (text + ch in prefixes)


def _oracle(schema: dict, value: str) -> bool:
    return (schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf)
            and ("pattern" not in schema or _search(schema["pattern"], value))
            and ("format" not in schema or ORACLES[schema["format"]](value)))


COMBOS = [
    {"type": "string", "format": "date", "pattern": "^20[0-9]{2}-0[1-3]"},
    {"type": "string", "format": "email", "maxLength": 12, "minLength": 8},
    {"type": "string", "format": "ipv4", "pattern": r"^10\.", "maxLength": 10},
    {"type": "string", "format": "uuid", "pattern": "^[0-9a-f-]+$"},
    {"type": "string", "format": "hostname", "pattern": "^[a-z]+\\.", "minLength": 6, "maxLength": 9},
    {"type": "string", "format": "duration", "maxLength": 5},
    {"type": "string", "format": "date-time", "pattern": "Z$", "minLength": 22},
    {"type": "string", "pattern": "^[a-c]+(?:-[0-9]+)?$", "minLength": 3, "maxLength": 5},
    {"type": "string", "pattern": "x|y", "minLength": 2, "maxLength": 4},
]


@pytest.mark.parametrize("schema", COMBOS, ids=lambda s: "+".join(k for k in s if k != "type"))
def test_pattern_format_and_length_bounds_hold_together_on_every_prefix(schema):
    rng = random.Random(json.dumps(schema))
    compiled = compile_schema(schema)
    assert compiled.unenforced == ()
    root = compiled.root
    tokens = [c for c in _PRINTABLE if c != "\\"] + ["\\u003a", "é"]
    walked = []
    for _ in range(25):  # no dead end: each accepted prefix has an accepted next character or is complete
        text = _walk(root, rng, tokens, 80)
        if text is not None:
            walked.append(json.loads(text))
            assert _oracle(schema, walked[-1]), (schema, text)
    assert len(walked) >= 10
    fmt = schema.get("format")
    seeds = walked + (_valid_examples(fmt, rng) if fmt else []) + ["abc", "ab-12", "xyz", "bx", "a-1"]
    candidates = seeds + [s[:i] + c + s[i + 1:] for s in seeds for i in rng.sample(range(len(s)), min(3, len(s)))
                          for c in rng.sample("0123456789:-.TZ@abxé", 3)]
    candidates += [s[:i] for s in seeds for i in range(len(s))]
    for value in candidates:
        valid = _oracle(schema, value)
        assert _complete(root, json.dumps(value)) == valid, (schema, value)
        if valid:
            assert _every_prefix_accepted(root, json.dumps(value, ensure_ascii=False))


def test_rules_no_string_meets_together_make_the_string_unsatisfiable():
    for schema, words in (({"type": "string", "pattern": "^a+$", "format": "date"}, "pattern '^a+$' and format 'date'"),
                          ({"type": "string", "pattern": "^abc", "maxLength": 2}, "pattern '^abc' and maxLength 2"),
                          ({"type": "string", "format": "uuid", "minLength": 37}, "format 'uuid' and minLength 37")):
        with pytest.raises(SchemaError, match=re.escape(f"no string satisfies its {words} at once")):
            compile_schema(schema)
    pruned = compile_schema({"type": ["string", "null"], "format": "ipv4", "maxLength": 6}).root
    assert JsonPrefix.start(pruned).feed('"') is None and _complete(pruned, "null")
    # an enum beside them keeps only the values all allow
    values = compile_schema({"enum": ["2024-01-01", "2023-01-01", "2024-1-1"], "format": "date", "pattern": "^2024"})
    assert [v for v in ("2024-01-01", "2023-01-01", "2024-1-1") if _complete(values.root, json.dumps(v))] == \
        ["2024-01-01"]


# -- draft 4's boolean exclusive bounds --

def _draft4_schema(rng: random.Random) -> dict:
    schema = {"type": rng.choice(["integer", "number"])}
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if rng.random() < 0.7:
            schema[bound] = rng.choice([rng.randint(-50, 50), round(rng.uniform(-50, 50), 1), 0])
            if rng.random() < 0.7:
                schema[flag] = rng.random() < 0.7
    if len(schema) == 1:  # unbounded numbers keep every written form (exponents too)
        schema.update({"minimum": rng.randint(-5, 5), "exclusiveMinimum": True})
    return schema


def _draft4_valid(schema: dict, text: str) -> bool:
    """Draft 4's verdict on ``text``, in the written form bounded numbers take (no exponent)."""
    if not re.fullmatch(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?", text):
        return False
    return jsonschema.Draft4Validator(schema).is_valid(json.loads(text))


@pytest.mark.parametrize("seed", range(30))
def test_draft4_boolean_exclusive_bounds_are_exact(seed):
    rng = random.Random(seed)
    schema = _draft4_schema(rng)
    texts = _number_texts(rng) + [str(i) for i in range(-52, 53)] + [f"{v}.{d}" for v in (-1, 0, 1) for d in "05"]
    texts += [json.dumps(schema[k]) for k in ("minimum", "maximum") if k in schema]
    try:
        compiled = compile_schema(schema)
    except SchemaError:
        assert not any(_draft4_valid(schema, t) for t in texts), schema
        return
    assert compiled.unenforced == ()
    array = compile_schema({"type": "array", "items": schema}).root
    for text in texts:
        valid = _draft4_valid(schema, text)
        assert _complete(compiled.root, text) == valid, (schema, text)
        assert _complete(array, f"[{text}]") == valid, (schema, text)
        if valid:
            assert _every_prefix_accepted(array, f"[{text}")
    for _ in range(20):
        text = _walk(array, rng, list("[-0123456789.,]"), 40)
        if text is not None and text != "[]":
            assert all(_draft4_valid(schema, t) for t in text[1:-1].split(",")), (schema, text)


def test_draft4_boolean_bounds_without_their_bound_are_named():
    assert compile_schema({"type": "integer", "exclusiveMaximum": False}).unenforced == ()
    with pytest.raises(SchemaError, match="exclusiveMaximum: true, as draft 4 writes it, needs maximum beside it"):
        compile_schema({"type": "integer", "exclusiveMaximum": True})


# -- oneOf: exactly one where the compiler proves the alternatives exclusive --

def _branch(rng: random.Random) -> dict:
    kind = rng.choice(["pattern", "length", "format", "enum", "range", "type"])
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^a", "^b", "b$", "^[ab]+$", "^1", "-"])}
    if kind == "length":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 2)}
    if kind == "format":
        return {"type": "string", "format": rng.choice(["date", "uuid", "ipv4"])}
    if kind == "enum":
        return {"enum": rng.sample(["a", "ab", "b1", "1", "2024-01-01", 1, 2.5, -3, None], 2)}
    if kind == "range":
        low = rng.randint(-3, 3)
        return {"type": rng.choice(["number", "integer"]), "minimum": low, "exclusiveMaximum": low + rng.randint(1, 3)}
    return {"type": rng.choice(["null", "boolean", "integer"])}


@pytest.mark.parametrize("seed", range(40))
def test_one_of_claimed_exclusive_holds_exactly_one(seed):
    """Where the compiler enforces a oneOf (no problem named), every value it completes has exactly one
    alternative valid, and every such value is accepted; where it names the oneOf, two alternatives share a
    value (found among the candidates)."""
    rng = random.Random(seed)
    schema = {"oneOf": [_branch(rng) for _ in range(rng.randint(2, 3))]}
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    strings = ["".join(t) for n in range(4) for t in itertools.product("ab1-", repeat=n)]
    candidates = strings + ["2024-01-01", "1999-01-01", "10.0.0.1", "123e4567-e89b-12d3-a456-426614174000",
                            "b23e4567-e89b-12d3-a456-426614174000", "b1"]
    values = candidates + [-3, -1.5, 0, 0.5, 1, 2, 2.5, 3, 5, None, True]
    compiled = compile_schema(schema)
    if compiled.unenforced:
        found = re.fullmatch(r"oneOf \(alternatives (\d+) and (\d+) may both hold, .+", compiled.unenforced[0])
        both = [schema["oneOf"][int(i)] for i in found.groups()]
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
        assert any(all(jsonschema.Draft202012Validator(b, format_checker=checker).is_valid(v) for b in both)
                   for v in values), schema
        return
    for value in values:
        valid = validator.is_valid(value)
        assert _complete(compiled.root, json.dumps(value)) == valid, (schema, value)
