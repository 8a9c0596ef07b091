"""The incremental JSON validator behind forced tool calls.

Oracle: Python's ``json`` module. Every prefix of a document ``json.dumps`` writes (any
separators, indentation, unicode, escapes) must be accepted and the whole must be complete;
whatever the validator accepts as complete must load with ``json.loads``; known invalid
prefixes are refused at the character that makes them invalid.
"""

from __future__ import annotations

import json
import random

import re

import pytest

from qlora.infer.json_prefix import MAX_WHITESPACE, JsonPrefix
from qlora.infer.json_schema import SchemaError, compile_schema, unenforced_keywords

from test_json_schema import OVERLAP


def _feed_each(text: str, state: JsonPrefix) -> JsonPrefix | None:
    for ch in text:
        state = state.feed(ch)
        if state is None:
            return None
    return state


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-10**12, 10**12)
    if kind == "float":
        return rng.choice([0.0, -0.5, 1e-7, 3.25e21, rng.uniform(-1e3, 1e3)])
    if kind == "str":
        alphabet = 'ab "\\/\n\t\x01é漢🙂\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}{rng.choice('xé')}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


@pytest.mark.parametrize("seed", range(40))
def test_every_prefix_of_real_json_is_accepted_and_the_whole_is_complete(seed):
    rng = random.Random(seed)
    value = {"root": _random_value(rng), "more": _random_value(rng)}
    for kwargs in (dict(), dict(ensure_ascii=False), dict(indent=2), dict(separators=(",", ":"))):
        text = json.dumps(value, **kwargs)
        state = JsonPrefix.start()
        for i, ch in enumerate(text):
            assert not state.complete
            state = state.feed(ch)
            assert state is not None, (text[:i + 1], kwargs)
        assert state.complete
        assert JsonPrefix.start().feed(text).complete  # fed at once: the same


@pytest.mark.parametrize("text, bad_at", [
    ('{"a": 01}', 7), ('{"a": 1.}', 8), ('{"a": 1e}', 8), ('{"a": -}', 7), ('{"a": +1}', 6),
    ('{"a": .5}', 6), ('{"a": 1,}', 8), ('{,}', 1), ('{"a" 1}', 5), ('{"a": tru}', 9), ('{"a": nul l}', 9),
    ('{"a": "\\x"}', 8), ('{"a": "\\u12g4"}', 11), ('{"a": "\x01"}', 7), ('{"a": [1,]}', 9), ('{"a": [1}', 8),
    ('{"a": 1}}', 8), ('{"a": 1} ', 8), ('[1]', 0), (' {}', 0), ("{'a': 1}", 1), ('{"a": True}', 6),
    ('{"a": NaN}', 6), ('{"a": 1]', 7),
])
def test_invalid_json_is_refused_at_the_first_bad_character(text, bad_at):
    assert _feed_each(text[:bad_at], JsonPrefix.start()) is not None
    assert _feed_each(text[:bad_at + 1], JsonPrefix.start()) is None


def test_strings_escapes_unicode_and_numbers():
    for text in ['{"s": "tab\\there \\"q\\" \\\\ \\/ \\b\\f\\n\\r \\u00e9\\uD83D\\uDE42"}', '{"é漢🙂": "🙂\u2028"}',
                 '{"n": [0, -0, 12, -3.5, 1e5, 1E+5, 2.5e-10, -0.0e0]}', '{"deep": [[[{"x": [{}]}]], []]}']:
        assert JsonPrefix.start().feed(text).complete and _feed_each(text, JsonPrefix.start()).complete
        json.loads(text)
    numbers = JsonPrefix.start(root_object=False)
    assert numbers.feed("-12.5e3").complete and not numbers.feed("-12.5e").complete
    assert numbers.feed("[1, 2]").complete and numbers.feed('"x"').complete and numbers.feed("12 ") is None


def test_whitespace_runs_are_capped():
    assert JsonPrefix.start().feed("{" + " " * MAX_WHITESPACE + "}").complete
    assert JsonPrefix.start().feed("{" + " " * (MAX_WHITESPACE + 1)) is None
    assert JsonPrefix.start().feed('{"a":' + "\n" * MAX_WHITESPACE + "1" + " " * MAX_WHITESPACE + "}").complete


def test_fuzzed_text_accepted_as_complete_is_json():
    rng = random.Random(0)
    complete = 0
    for _ in range(3000):
        text = json.dumps({"a": _random_value(rng)})
        for _ in range(rng.randint(1, 3)):  # mutate: delete, duplicate or insert a character
            i = rng.randrange(len(text))
            text = rng.choice([text[:i] + text[i + 1:], text[:i] + text[i] + text[i:],
                               text[:i] + rng.choice('{}[]",:0e.-tn \\') + text[i:]])
        state = JsonPrefix.start().feed(text)
        if state is not None and state.complete:
            complete += 1
            assert isinstance(json.loads(text), dict), text
        try:
            valid = isinstance(json.loads(text), dict) and not text[0].isspace() and not text[-1].isspace()
        except json.JSONDecodeError:
            valid = False
        if valid and "  " * 11 not in text:
            assert state is not None and state.complete, text
    assert complete > 100


SCHEMA = compile_schema({
    "type": "object", "additionalProperties": False, "required": ["city", "days"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f", 1]},
                   "ok": {"type": ["boolean", "null"]}, "tags": {"type": "array"},
                   "fixed": {"const": {"a": 1}}}}).root


@pytest.mark.parametrize("text, valid", [
    ('{"city": "Paris", "days": 3}', True),
    ('{"days": 3, "unit": "f", "city": "x", "ok": null, "tags": [1, {"z": "y"}], "fixed": {"a":1}}', True),
    ('{"unit": 1, "city": "", "days": -0, "ok": true}', True),
    ('{"city": "Paris"}', False),  # 'days' is required
    ('{"city": "Paris", "days": 3.5}', False),  # an integer
    ('{"city": 3', False),  # a string
    ('{"town"', False),  # additionalProperties: false
    ('{"city": "a", "city"', False),  # a duplicate key
    ('{"unit": "k', False), ('{"unit": "c",', True), ('{"unit": 12', False),  # enum values only
    ('{"ok": 1', False), ('{"tags": {', False), ('{"fixed": {"a": 2', False),
    ('{"city": "x", "days": 1, "unit": "c", "ok": true, "tags": [], "fixed": {"a":1},', False),  # no key left
])
def test_the_top_level_follows_the_schema(text, valid):
    state = JsonPrefix.start(SCHEMA).feed(text)
    assert (state is not None) == valid
    if valid and text.endswith("}"):
        assert state.complete and json.loads(text)


def test_open_schemas_take_any_key_and_unconstrained_values_are_any_json():
    schema = compile_schema({"type": "object", "properties": {"n": {"type": "number"}}}).root
    assert JsonPrefix.start(schema).feed('{"other": {"n": "nested keys are free"}, "n": 2.5e3}').complete
    assert JsonPrefix.start(schema).feed('{"n": "2"') is None
    assert JsonPrefix.start(schema).feed("[") is None  # arguments are an object
    assert JsonPrefix.start(compile_schema({}).root).feed("[1]").complete


def test_an_any_of_of_bare_types_is_a_type_union():
    """pydantic writes ``int | None`` as ``anyOf`` of bare types: enforced like ``"type": ["integer", "null"]``."""
    schema = compile_schema({"type": "object", "properties": {
        "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "title": "N"}}}).root
    assert JsonPrefix.start(schema).feed('{"n": null}').complete and JsonPrefix.start(schema).feed('{"n": 12}').complete
    assert JsonPrefix.start(schema).feed('{"n": "1') is None and JsonPrefix.start(schema).feed('{"n": 1.') is None


@pytest.mark.parametrize("schema, missing", [
    ({"type": "object", "properties": {"a": {"type": "string", "title": "A", "description": "d"}}, "required": ["a"],
      "additionalProperties": False, "title": "T", "$schema": "x", "examples": [{}]}, []),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]}}},
     []),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                             "minItems": 1, "maxItems": 4, "prefixItems": [{"const": "x"}]}}}, []),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#"}}, "$defs": {"A": {}}}, []),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "pattern": "x+",
                                                                        "format": "email"}},
                                       "n": {"$ref": "#/$defs/N"}},
      "$defs": {"N": {"type": "number", "minimum": 1, "multipleOf": 2}, "Unused": {"uniqueItems": True}}},
     []),
    ({"type": "string", "format": "uri"}, ["format ('uri' is not a format enforced)"]),
    ({"type": "string", "pattern": "a(?=b)"}, ["pattern (a lookaround or group flag at offset 1 of 'a(?=b)')"]),
    ({"type": "string", "pattern": "(a)\\1"}, ["pattern (the escape \\1 (a backreference, boundary or property, or one "
                                            "the dialects read differently) at offset 3 of '(a)\\\\1')"]),
    ({"type": "string", "format": "date", "maxLength": 10}, []),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]},
     ["oneOf " + OVERLAP]),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}, {"const": None}]}, []),
    ({"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, ["anyOf (beside other keywords)"]),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}], "not": {"const": ""}}, ["not", "allOf"]),
    ({"allOf": [{"$ref": "#/definitions/A"}], "definitions": {"A": {"type": "integer"}}}, []),
    ({"$ref": "https://example.com/s.json"}, ["$ref (only local references, '#...', are resolved)"]),
    ({"enum": ["a", 1], "minimum": 0}, []),
    ({"enum": ["a", 1], "uniqueItems": True}, ["uniqueItems", "enum (beside uniqueItems)"]),
])
def test_unenforced_keywords_names_each_part_a_reply_could_break(schema, missing):
    assert unenforced_keywords(schema) == missing


@pytest.mark.parametrize("schema, where", [
    ({"type": "wat"}, "type: 'wat' is not a JSON type"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "properties.a.type: 'date' is not a JSON type"),
    ({"type": []}, "type: [] is not a JSON type"),
    ({"properties": {"a": {"$ref": "#/$defs/Missing"}}}, "properties.a.$ref: '#/$defs/Missing' points to nothing"),
    ({"$ref": 3}, "$ref: a reference is a string"),
    ({"type": "string", "maxLength": -1}, "maxLength: must be a non-negative integer, not -1"),
    ({"type": "array", "items": {"type": "array", "minItems": 1.5}}, "items.minItems: must be a non-negative integer"),
    ({"type": "number", "multipleOf": 0}, "multipleOf: 0 is not a number above 0"),
    ({"type": "integer", "minimum": "1"}, "minimum: '1' is not a number"),
    ({"type": "number", "exclusiveMinimum": True}, "exclusiveMinimum: true, as draft 4 writes it, needs minimum"),
    ({"type": "string", "pattern": "(a"}, "pattern: '(a' is not a regular expression"),
    ({"type": "string", "format": 5}, "format: a format is a name"),
    ({"type": "object", "required": "a"}, "required: must be a list of property names"),
    ({"type": "object", "properties": []}, "properties: must be an object of schemas"),
    ({"enum": "a"}, "enum: must be a list of values"),
    ({"anyOf": []}, "anyOf: must be a non-empty list of schemas"),
    ({"allOf": {"type": "string"}}, "allOf: must be a non-empty list of schemas"),
    ({"type": "array", "items": 3}, "items: a schema is an object or a boolean, not 3"),
])
def test_an_invalid_schema_is_refused_naming_the_path_inside_it(schema, where):
    """Values JSON Schema itself does not allow are a mistake in the schema, refused whatever strict says (they
    were named as unenforced and ignored); valid but unenforced keywords stay named, as above."""
    with pytest.raises(SchemaError, match="not a valid JSON Schema: " + re.escape(where)):
        compile_schema(schema)
