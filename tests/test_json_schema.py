"""JSON Schemas enforced at every depth by the constrained-decoding automaton.

Oracle: the ``jsonschema`` library (Draft 2020-12). For each schema (pydantic models as the
``openai`` client sends them, and hand-written ones covering every enforced keyword):

- every prefix of every valid document (random instances, written compactly, spaced,
  indented, ASCII-escaped) is accepted and the whole is complete;
- mutated documents (values swapped, keys dropped or added, characters edited): whatever the
  automaton accepts as complete is valid, and whatever is valid is accepted once rewritten
  by ``json.dumps``;
- random walks that pick any accepted character never reach a dead end, and every document
  they complete is valid.
"""

from __future__ import annotations

import copy
import decimal
import enum
import gc
import json
import math
import random
import re
from typing import Literal, Optional, Union

import pytest
from pydantic import BaseModel, Field, conlist, constr

from qlora.infer.json_prefix import MAX_THREADS, MAX_WHITESPACE, JsonPrefix
from qlora.infer.json_schema import SchemaError, compile_schema, unenforced_keywords

OVERLAP = ("(alternatives 0 and 1 may both hold, so 'exactly one' cannot be enforced: it would be decoded as anyOf; "
           "write anyOf if both may hold, or tell them apart by type, const/enum values or a required property whose "
           "values differ)")

jsonschema = pytest.importorskip("jsonschema")
openai_pydantic = pytest.importorskip("openai.lib._pydantic")


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "dark blue"


class Tree(BaseModel):
    label: str
    children: list["Tree"]


class Step(BaseModel):
    explanation: str
    output: Optional[int]


class Report(BaseModel):
    """A nested model: a list of sub-models, an Optional field, an enum, a Literal and a recursive model."""

    title: str
    steps: list[Step]
    color: Color
    mood: Literal["ok", "meh"]
    note: Optional[str]
    tree: Tree
    score: Union[float, bool]


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Loose(BaseModel):  # not strict: a dict (additionalProperties schema), a tuple, bounded strings and lists
    counts: dict[str, int]
    pair: tuple[int, str]
    code: constr(min_length=2, max_length=4)
    few: conlist(bool, min_length=1, max_length=3)
    pet: Union[Cat, Dog] = Field(discriminator="kind")
    maybe: Optional[Tree] = None


LIST = {"type": "object", "required": ["v", "next"], "additionalProperties": False,
        "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}

SCHEMAS = {
    "report (openai strict)": openai_pydantic.to_strict_json_schema(Report),
    "loose pydantic": Loose.model_json_schema(),
    "linked list via #": LIST,
    "tuple root": {"type": "array", "prefixItems": [{"type": "integer"}, {"enum": ["x", "y\u00e9"]}],
                   "items": False, "minItems": 1},
    "type lists": {"type": "object", "properties": {
        "a": {"type": ["string", "null", "array"], "items": {"enum": [1, 2.5, None, True, "s"]}, "maxItems": 3,
              "maxLength": 3},
        "b": {"type": ["integer", "boolean"]}}, "required": ["a"], "additionalProperties": False},
    "constants": {"type": "object", "properties": {
        "c": {"const": {"k": [1, "x", {"z": None}]}}, "e": {"enum": ["a\"b", "\\", "🙂", {"q": 1}, [], 0]}},
        "required": ["c", "e"]},
    "open objects": {"type": "object", "properties": {"n": {"type": "number"}, "s": {"type": "string", "minLength": 1}},
                     "additionalProperties": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "untyped": {"properties": {"a": {"type": "string"}}, "items": {"type": "integer"}},
    "oneOf tagged": {"oneOf": [
        {"type": "object", "properties": {"t": {"const": "a"}, "x": {"type": "integer"}}, "required": ["t", "x"],
         "additionalProperties": False},
        {"type": "object", "properties": {"t": {"const": "b"}, "x": {"type": "string"}}, "required": ["t", "x"],
         "additionalProperties": False}]},
    "definitions and allOf": {"definitions": {"P": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 2}, "kids": {"type": "array", "items": {"$ref": "#/definitions/P"},
                                                             "maxItems": 2}}, "required": ["name"]}},
        "allOf": [{"$ref": "#/definitions/P"}]},
}


def _resolve(root, ref: str):
    target = root
    for part in [p for p in ref[1:].split("/") if p]:
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return target


def _any_value(rng: random.Random, depth: int):
    kind = rng.choice(["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else []))
    if kind == "int":
        return rng.randint(-10**6, 10**6)
    if kind == "float":
        return rng.choice([-0.5, 1e-7, 3.25e21, 0.1])
    if kind == "str":
        return _string(rng, 0, 6)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_any_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_string(rng, 1, 4): _any_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _string(rng: random.Random, low: int, high) -> str:
    high = min(high, low + 6)
    return "".join(rng.choice('ab z"\\/\n\té漢🙂\u2028') for _ in range(rng.randint(low, high)))


class _Stuck(Exception):
    """The generator went too deep (a schema whose values must nest without end)."""


def _instance(schema, rng: random.Random, root, depth: int = 0):
    """A random value meant to be valid under ``schema`` (checked by the oracle afterwards)."""
    if depth > 40:
        raise _Stuck
    if schema is True or schema == {}:
        return _any_value(rng, depth)
    if "$ref" in schema:
        return _instance(_resolve(root, schema["$ref"]), rng, root, depth + 1)
    for union in ("anyOf", "oneOf", "allOf"):
        if union in schema:
            members = list(schema[union])
            if depth > 3:  # deep: prefer members that do not recurse
                members.sort(key=lambda m: "$ref" in json.dumps(m))
                return _instance(members[0], rng, root, depth + 1)
            return _instance(rng.choice(members), rng, root, depth + 1)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    if "enum" in schema:
        return copy.deepcopy(rng.choice(schema["enum"]))
    types = schema.get("type", ["object", "array", "string", "integer", "null"])
    types = [types] if isinstance(types, str) else types
    kind = rng.choice(types) if depth <= 3 else next((t for t in types if t not in ("object", "array")), types[0])
    if kind == "string":
        return _string(rng, schema.get("minLength", 0), schema.get("maxLength", math.inf))
    if kind == "integer":
        return rng.randint(-10**9, 10**9)
    if kind == "number":
        return rng.choice([rng.randint(-99, 99), rng.uniform(-1e6, 1e6), 2.5e-8])
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "object":
        props, required = schema.get("properties", {}), set(schema.get("required", ()))
        out = {k: _instance(s, rng, root, depth + 1) for k, s in props.items() if k in required or rng.random() < 0.5}
        extra = schema.get("additionalProperties", True)
        if extra is not False and rng.random() < 0.5:
            for _ in range(rng.randint(1, 2)):
                key = _string(rng, 1, 3)
                if key not in props:
                    out[key] = _instance(extra, rng, root, depth + 1)
        return dict(rng.sample(list(out.items()), len(out)))  # any order
    prefix = schema.get("prefixItems", [])
    items = schema.get("items", True)
    low = schema.get("minItems", 0)
    high = min(schema.get("maxItems", low + 3), low + 3, len(prefix) if items is False else math.inf)
    count = rng.randint(low, max(low, high)) if depth <= 3 else low
    return [_instance(prefix[i] if i < len(prefix) else items, rng, root, depth + 1) for i in range(count)]


def _property_names(schema) -> set[str]:
    if isinstance(schema, dict):
        names = set(schema["properties"]) if isinstance(schema.get("properties"), dict) else set()
        return names.union(*(_property_names(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_property_names(v) for v in schema))
    return set()


def _valid(schema, value) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def _integral(value):
    """``value`` with integral floats written as integers (how an integer is written under the constraint)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def _dumps(value, **kwargs) -> str:
    """``json.dumps``, but floats it would write with an exponent written positionally (how a bounded number is
    written under the constraint)."""
    floats: list[float] = []

    def mark(v):
        if isinstance(v, float) and "e" in repr(v):
            floats.append(v)
            return f"\0{len(floats) - 1}\0"
        if isinstance(v, list):
            return [mark(x) for x in v]
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        return v

    text = json.dumps(mark(value), **kwargs)
    for i, v in enumerate(floats):
        text = text.replace(f'"\\u0000{i}\\u0000"', format(decimal.Decimal(repr(v)), "f"))
    return text


def _feed_each(state: JsonPrefix, text: str) -> JsonPrefix | None:
    for ch in text:
        state = state.feed(ch)
        if state is None:
            return None
    return state


def test_the_schemas_compile_with_nothing_unenforced():
    for name, schema in SCHEMAS.items():
        assert compile_schema(schema).unenforced == (), name


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_prefix_of_every_valid_document_is_accepted(name):
    schema, rng = SCHEMAS[name], random.Random(name)
    root = compile_schema(schema).root
    documents = 0
    for _ in range(60):
        value = _instance(schema, rng, schema)
        if not _valid(schema, value):
            continue
        documents += 1
        for kwargs in ({}, {"ensure_ascii": False}, {"indent": 2}, {"separators": (",", ":")}):
            text = json.dumps(value, **kwargs)
            state = JsonPrefix.start(root)
            for i, ch in enumerate(text):
                assert not state.closed
                state = state.feed(ch)
                assert state is not None, (text[:i + 1], text)
            assert state.complete, text
            cut = rng.randrange(len(text) + 1)  # fed in two pieces: the same
            assert JsonPrefix.start(root).feed(text[:cut]).feed(text[cut:]).complete
    assert documents >= 40  # the generator mostly writes valid documents: the oracle agrees with it


def _mutate(value, rng: random.Random, depth: int = 0):
    """``value`` with one random change somewhere inside."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        out = dict(value)
        action = rng.random()
        if action < 0.2:
            del out[key]
        elif action < 0.3:
            out[_string(rng, 1, 3)] = _any_value(rng, 2)
        else:
            out[key] = _mutate(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        action = rng.random()
        if action < 0.2:
            return value[:i] + value[i + 1:]
        if action < 0.3:
            return value + [copy.deepcopy(value[i])]
        return value[:i] + [_mutate(value[i], rng, depth + 1)] + value[i + 1:]
    return rng.choice([_any_value(rng, 2), None, "", 0, 1.5, True, [], {}, "red", "x" * 5, [1], {"kind": "cat"}])


@pytest.mark.parametrize("name", SCHEMAS)
def test_mutated_documents_are_accepted_exactly_when_valid(name):
    schema, rng = SCHEMAS[name], random.Random(name + "mutate")
    root = compile_schema(schema).root
    seen = {True: 0, False: 0}
    for _ in range(400):
        value = _instance(schema, rng, schema)
        for _ in range(rng.randint(1, 2)):
            value = _mutate(value, rng)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.3:  # and sometimes a character edit
            i = rng.randrange(len(text))
            text = rng.choice([text[:i] + text[i + 1:], text[:i] + rng.choice('{}[]",:0.-tn \\') + text[i:]])
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = valid = None
        else:
            valid = _valid(schema, loaded)
            seen[valid] += 1
        state = JsonPrefix.start(root).feed(text)
        if state is not None and state.complete:
            assert valid, text  # accepted: the oracle agrees it is valid
        if valid:  # valid: accepted once written as json.dumps writes it (integers without a fraction)
            canonical = json.dumps(_integral(loaded))
            assert JsonPrefix.start(root).feed(canonical).complete, canonical
    assert seen[True] >= 5 and seen[False] >= 30, seen


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_never_reach_a_dead_end_and_end_valid(name):
    schema, rng = SCHEMAS[name], random.Random(name + "walk")
    root = compile_schema(schema).root
    # tokens, as a tokenizer has: single characters, and whole keys (so that required keys get written)
    keys = [json.dumps(k, ensure_ascii=False) + ":" for k in sorted(_property_names(schema))]
    alphabet = sorted(set(json.dumps(schema, ensure_ascii=False) + '{}[]",: -0123456789.eE+truefalsn\\uabcdef\n'))
    finished = 0
    for _ in range(25):
        state, text = JsonPrefix.start(root), ""
        while not state.closed and len(text) < 3000:
            options = [c for c in alphabet if state.accepts(c)]
            assert options, f"dead end after {text!r}"  # no accepted prefix is a dead end
            if state.complete and rng.random() < 0.3:
                break
            options += [k for k in keys if state.accepts(k)]
            if len(text) > 40:  # later, lean towards ending: keys (required ones among them), then closing characters
                draw = rng.random()
                named = [c for c in options if c in keys]
                closers = [c for c in options if c in '"}]']
                options = named if named and draw < 0.5 else closers if closers and draw < 0.8 else options
            token = rng.choice(options)
            state, text = state.feed(token), text + token
        if state.complete:
            finished += 1
            assert _valid(schema, json.loads(text)), text
    assert finished >= 15, finished


def test_nested_parts_are_enforced():
    """What the top-level-only automaton let through is refused at the character that breaks it."""
    root = compile_schema(openai_pydantic.to_strict_json_schema(Report)).root
    good = Report(title="t", steps=[Step(explanation="e", output=None)], color=Color.blue, mood="ok", note=None,
                  tree=Tree(label="a", children=[Tree(label="b", children=[])]), score=True).model_dump_json()
    assert JsonPrefix.start(root).feed(good).complete
    for bad in ('"steps":[{"explanation":"e","output":1.', '"steps":[{"explanation":"e","extra"',
                '"steps":[{"explanation":"e"}', '"color":"dark red"', '"tree":{"label":"a","children":[{"label":1',
                '"tree":{"label":"a","children":[{"label":"b","children":[],"x"', '"note":3', '"score":"1'):
        text = '{"title":"t",' + bad
        assert JsonPrefix.start(root).feed(text) is None, text
        assert JsonPrefix.start(root).feed(text[:text.index(":") + 1]) is not None, text  # the key itself is fine


def test_strings_bounds_and_enums_read_escapes_as_the_characters_they_spell():
    root = compile_schema({"type": "array", "items": {"anyOf": [
        {"enum": ["é🙂", "a\"b"]}, {"type": "string", "minLength": 2, "maxLength": 2}]}}).root
    assert JsonPrefix.start(root).feed('["\\u00e9\\ud83d\\ude42", "\\u00e9🙂", "a\\"b", "\\ud83d\\ude42x"]').complete
    assert JsonPrefix.start(root).feed('["abc') is None and JsonPrefix.start(root).feed('["a"') is None
    assert JsonPrefix.start(root).feed('["\\u00e9\\ud83d\\ude42!') is None


def test_arrays_follow_prefix_items_and_bounds():
    root = compile_schema({"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"type": "null"},
                           "minItems": 2, "maxItems": 3}).root
    assert JsonPrefix.start(root).feed("[true, null]").complete and JsonPrefix.start(root).feed("[false,null,null]")
    for bad in ("[]", "[true]", "[null", "[true, 1", "[true, null, null, "):
        state = JsonPrefix.start(root).feed(bad)
        assert state is None or not state.complete, bad


def test_unsatisfiable_schemas_raise_and_unsatisfiable_options_are_pruned():
    for schema in ({"$ref": "#"}, {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"anyOf": [{"$ref": "#/$defs/A"}]}},
                                   "$ref": "#/$defs/A"},
                   {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # infinite only
                   {"type": "object", "required": ["x"], "additionalProperties": False},
                   {"type": "string", "enum": [1, 2]}, {"type": "array", "minItems": 3, "maxItems": 2},
                   {"anyOf": [{"type": "string", "minLength": 3, "maxLength": 1}, False]}):
        with pytest.raises(SchemaError):
            compile_schema(schema)
    root = compile_schema({"type": "object", "properties": {"a": False, "b": {"type": "array", "items": False}},
                           "additionalProperties": False}).root
    assert JsonPrefix.start(root).feed('{"a') is None and JsonPrefix.start(root).feed('{"b": [') is not None
    assert JsonPrefix.start(root).feed('{"b": [1') is None and JsonPrefix.start(root).feed('{"b": []}').complete
    pruned = compile_schema({"anyOf": [{"$ref": "#"}, {"type": "integer"}]}).root  # left recursion: just integer
    assert JsonPrefix.start(pruned).feed("12").complete and JsonPrefix.start(pruned).feed('"') is None


def test_one_of_is_enforced_when_its_alternatives_exclude_each_other():
    schema = SCHEMAS["oneOf tagged"]
    root = compile_schema(schema).root
    assert JsonPrefix.start(root).feed('{"t": "a", "x": 1}').complete
    assert JsonPrefix.start(root).feed('{"x": "s", "t": "b"}').complete
    assert JsonPrefix.start(root).feed('{"t": "a", "x": "s"}') is None
    assert JsonPrefix.start(root).feed('{"x": 1, "t": "b"') is None
    assert unenforced_keywords({"oneOf": [{"type": "number"}, {"type": "integer"}]}) == [
        "oneOf " + OVERLAP]


def test_undecided_alternatives_that_nest_are_capped_not_exponential():
    twins = compile_schema({"anyOf": [{"type": "array", "items": {"$ref": "#"}},
                                      {"type": "array", "items": {"$ref": "#"}, "title": "twin"}]}).root
    state = JsonPrefix.start(twins)
    for _ in range(30):  # 2**30 readings if each level doubled them
        state = state.feed("[")
        assert len(state.threads) <= MAX_THREADS
    assert state.feed("]" * 30).complete and state.feed("]" * 31) is None


def test_union_threads_stay_few_and_whitespace_stays_capped():
    root = compile_schema(openai_pydantic.to_strict_json_schema(Report)).root
    state = JsonPrefix.start(root).feed('{"title": "t", "score": ')
    assert len(state.threads) == 1  # nothing read yet of the union's value: one thread waiting for it
    assert len(state.feed("1").threads) == 1 and state.feed("t") is not None and state.feed('"') is None
    assert JsonPrefix.start(root).feed("{" + " " * MAX_WHITESPACE + '"title"') is not None
    assert JsonPrefix.start(root).feed("{" + " " * (MAX_WHITESPACE + 1)) is None


def _random_schema(rng: random.Random, depth: int = 0, defs: tuple[str, ...] = ()):
    """A random schema over the enforced keywords (references to ``defs``, which may recurse)."""
    kind = rng.choice(["scalar", "enum", "object", "array", "anyOf", "oneOf", "ref", "types"] if depth < 3 else
                      ["scalar", "enum", "types"] + (["ref"] if defs else []))
    if kind == "ref" and defs:
        return {"$ref": rng.choice([f"#/$defs/{d}" for d in defs])}
    if kind == "scalar" or (kind == "ref" and not defs):
        schema = {"type": rng.choice(["string", "integer", "number", "boolean", "null"])}
        draw = rng.random()
        if schema["type"] == "string" and draw < 0.5:
            low = rng.randint(0, 3)
            schema.update({"minLength": low, "maxLength": low + rng.randint(0, 3)})
        elif schema["type"] == "string" and draw < 0.75:  # no '$', which Python's re also matches before a '\n'
            schema["pattern"] = rng.choice(["^[ab]+", "b", "^é?c", "^(?:a|bc){1,2}z", "^[^a-c]"])
        elif schema["type"] in ("integer", "number") and draw < 0.5:
            for key in rng.sample(["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"], 2):
                schema[key] = rng.choice([-3, 0, 2, 2.5, 10**6])
        return schema
    if kind == "enum":
        values = rng.sample(["a", "b c", "é", "", 0, 1, -2.5, True, None, {"k": [1]}, [None, "x"]], rng.randint(1, 4))
        return {"const": values[0]} if len(values) == 1 and rng.random() < 0.5 else {"enum": values}
    if kind == "types":
        return {"type": rng.sample(["string", "integer", "number", "boolean", "null", "array", "object"],
                                   rng.randint(1, 3)), "maxItems": 2}
    if kind in ("anyOf", "oneOf"):
        return {kind: [_random_schema(rng, depth + 1, defs) for _ in range(rng.randint(1, 3))]}
    if kind == "object":
        names = rng.sample(["a", "b", "cd", "é", "k k"], rng.randint(0, 4))
        schema = {"type": "object", "properties": {n: _random_schema(rng, depth + 1, defs) for n in names},
                  "required": [n for n in names if rng.random() < 0.6]}
        extra = rng.random()
        if extra < 0.5:
            schema["additionalProperties"] = False
        elif extra < 0.7:
            schema["additionalProperties"] = _random_schema(rng, depth + 1, defs)
        return schema
    schema = {"type": "array", "items": _random_schema(rng, depth + 1, defs)}
    if rng.random() < 0.3:
        schema["prefixItems"] = [_random_schema(rng, depth + 1, defs) for _ in range(rng.randint(1, 2))]
    low = rng.choice([0, 0, 1, 2])
    schema.update({"minItems": low, "maxItems": low + rng.randint(0, 2)})
    return schema


def _verdict(schema, value) -> bool | None:
    """The oracle's answer; None where it recurses without end (left recursion such as
    ``{"anyOf": [{"$ref": "#"}, ...]}``, which the compiler reads as the other alternatives).

    The cyclic garbage collector is paused meanwhile: run at that depth, the finalizer of some earlier test's
    garbage has no stack left, and its failure (unraisable) failed this test in whole-suite runs."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _valid(schema, value)
    except RecursionError:
        return None
    finally:
        if collecting:
            gc.enable()


def _instances(schema, rng: random.Random, count: int) -> list:
    out = []
    for _ in range(count):
        try:
            out.append(_instance(schema, rng, schema))
        except _Stuck:
            pass
    return out


@pytest.mark.parametrize("seed", range(120))
def test_random_schemas_hold_the_same_properties(seed):
    """Random schemas over the enforced keywords: prefixes of valid documents accepted, no dead ends, and only
    valid documents completed (or, for a schema the compiler finds unsatisfiable, no valid document found)."""
    rng = random.Random(seed)
    defs = {"D0": _random_schema(rng, 1, ("D0",))}
    schema = {**_random_schema(rng, 0, ("D0",)), "$defs": defs}
    try:
        root = compile_schema(schema).root
    except SchemaError:
        assert not any(_verdict(schema, value) for value in _instances(schema, rng, 50))
        return
    unenforced = compile_schema(schema).unenforced
    assert all(re.fullmatch(r"(.+\.)?oneOf \(alternatives \d+ and \d+ may both hold, .+", u) for u in unenforced), \
        unenforced
    exact = not unenforced  # a oneOf claimed exclusive is checked here too
    for value in _instances(schema, rng, 20):
        if _verdict(schema, value):
            text = _dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
            assert _feed_each(JsonPrefix.start(root), text).complete, text
        mutated = _integral(json.loads(json.dumps(_mutate(value, rng))))
        state, valid = JsonPrefix.start(root).feed(_dumps(mutated)), _verdict(schema, mutated)
        if exact and state is not None and state.complete:
            assert valid in (True, None), (schema, mutated)
        if valid:
            assert state is not None and state.complete, (schema, mutated)
    alphabet = sorted(set(json.dumps(schema, ensure_ascii=False) + '{}[]",: -0123456789.etruefalsn\\u'))
    keys = [json.dumps(k, ensure_ascii=False) + ":" for k in sorted(_property_names(schema))]
    for _ in range(10):
        state, text = JsonPrefix.start(root), ""
        while not state.closed and len(text) < 2000:
            options = [c for c in alphabet if state.accepts(c)]
            assert options or state.complete, f"dead end after {text!r}"
            if not options or (state.complete and rng.random() < 0.3):
                break
            options += [k for k in keys if state.accepts(k)]
            if len(text) > 30:
                draw, closers = rng.random(), [c for c in options if c in '"}]']
                named = [c for c in options if c in keys]
                options = named if named and draw < 0.4 else closers if closers and draw < 0.8 else options
            token = rng.choice(options)
            state, text = state.feed(token), text + token
        if state.complete and exact:
            assert _verdict(schema, json.loads(text)) in (True, None), (schema, text)
