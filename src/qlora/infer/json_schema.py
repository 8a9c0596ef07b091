"""JSON Schemas compiled into the graph of rules :class:`~qlora.infer.json_prefix.JsonPrefix` decodes under.

Constrained decoding can only promise what it checks at every character, so a schema is
compiled once into :class:`Node` s, shared and never changed afterwards, and the parts it
cannot check exactly are named (:attr:`Compiled.unenforced`) so that a ``strict`` request
asking for them is refused instead of silently broken.

Enforced at any depth (the subset OpenAI's Structured Outputs documents, and a little more):
``type`` (a name or a list), ``properties``, ``required``, ``additionalProperties`` (false,
true, absent or a schema), ``items`` (a schema, or draft-7's list with ``additionalItems``),
``prefixItems``, ``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern``
(:mod:`~qlora.infer.regex`'s subset of ECMA-262), ``format`` (:mod:`~qlora.infer.string_formats`:
date, time, date-time, duration, uuid, ipv4, ipv6, hostname, email), ``minimum``/``maximum``,
``exclusiveMinimum``/``exclusiveMaximum`` and ``multipleOf`` (:mod:`~qlora.infer.number_range`),
``pattern``, ``format`` and the length bounds together (:mod:`~qlora.infer.string_rule`),
``enum``/``const`` (values filtered by the keywords beside them), ``anyOf``, ``oneOf`` whose
alternatives cannot both hold (different types, different constant values, strings no string
satisfies both rules of, numbers whose bounds do not meet, or objects told apart by a required
property such as pydantic's discriminator), ``allOf`` of one schema, and
``$ref`` to any local JSON pointer (``#``, ``#/$defs/X``, ``#/definitions/X``), recursion included.
Annotations (``title``, ``description``, ``default``, ``examples``, ...) change nothing.

Everything else (``uniqueItems``, ``not``, ``if``, ``minProperties``, a pattern outside the
subset, another format, a ``oneOf`` whose alternatives may both hold, which OpenAI's strict mode
refuses whole, ...) is unenforced: named by path and otherwise ignored. Exactness notes: an ``integer`` is written
without fraction or exponent, a bounded number without exponent (under ``multipleOf`` with
only zeros past the multiple's fraction digits), an ``enum``/``const`` number as
``json.dumps`` writes it (or ``1.0`` for ``1``), and a string under a pattern or format
without lone surrogates (which no Unicode string holds); every valid value can still be
written, in that form.

A schema that is not valid JSON Schema (a ``type`` no JSON type is named, a ``$ref`` to nothing, a
negative ``maxLength``, ``multipleOf`` 0, a ``pattern`` that is no regular expression, a subschema that
is neither an object nor a boolean, ...) raises :class:`SchemaError` naming each such value by path,
strict or not: it is a mistake in the schema, not a keyword left unenforced.

A schema no finite JSON value satisfies (a ``$ref`` cycle without content, a required
property that may not appear, ``minItems`` above ``maxItems``, ...) raises
:class:`SchemaError`: decoding under it could never end. Unsatisfiable optional parts are
pruned (that key may not be written, that ``anyOf`` branch is never taken), so decoding
never reaches a prefix that no valid document extends. A schema nested more than
:data:`MAX_DEPTH` levels (subschemas inside subschemas, or a chain of ``$ref`` s followed
to its end) raises :class:`SchemaError` too: compiling recurses once a level.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

from .number_range import KEYWORDS as NUMBER_KEYWORDS
from .number_range import NumberRange
from .regex import PatternError, Regex
from .string_formats import format_regex
from .string_rule import StringRule

TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$anchor", "contentEncoding", "contentMediaType",
                         "discriminator", "$defs", "definitions"})  # change no valid value (definitions: by $ref)
_ENFORCED = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items",
                       "prefixItems", "additionalItems", "minItems", "maxItems", "minLength", "maxLength", "anyOf",
                       "oneOf", "allOf", "$ref", "pattern", "format", *NUMBER_KEYWORDS})
_BESIDE_ENUM = frozenset({"type", "minLength", "maxLength", "pattern", "format", *NUMBER_KEYWORDS})  # filter enums
MAX_DEPTH = 128  # schemas nested (or $ref chains followed) deeper are refused: compiling recurses once a level


class SchemaError(ValueError):
    """No finite JSON value satisfies the schema (the message names where)."""


class Node:
    """One schema, compiled. A union (``anyOf``, a ``$ref``, ...) has ``alts``; a leaf has the rest.

    Leaf fields: ``types`` the JSON types any value of may be given ("integer" only without
    "number"); ``strings`` and ``literals`` further values allowed (an ``enum``: decoded strings,
    and the JSON text of numbers, booleans and null); object rules ``properties``, ``required``,
    ``extra`` (the additionalProperties schema, None: no other key) and ``keys`` (the declared
    keys that may be written); array rules ``prefix``, ``items`` (None: no more items),
    ``min_items``, ``max_items``; string bounds ``min_length``, ``max_length`` (code points) and
    ``pattern`` (a ``pattern`` or ``format``; where several rules meet, a
    :class:`~qlora.infer.string_rule.StringRule` checking them and the length bounds together); ``range`` the
    numbers allowed.
    ``leaves``: the leaves a value of a union may follow (a leaf: itself), satisfiable ones only.
    """

    __slots__ = ("alts", "leaves", "types", "strings", "literals", "properties", "required", "extra", "keys",
                 "prefix", "items", "min_items", "max_items", "min_length", "max_length", "pattern", "range",
                 "path")

    def __init__(self, path: str) -> None:
        self.alts: tuple[Node, ...] | None = None
        self.leaves: tuple[Node, ...] = ()
        self.types: frozenset[str] = frozenset()
        self.strings: frozenset[str] | None = None
        self.literals: tuple[str, ...] = ()
        self.properties: dict[str, Node] = {}
        self.required: frozenset[str] = frozenset()
        self.extra: Node | None = None
        self.keys: tuple[str, ...] = ()
        self.prefix: tuple[Node, ...] = ()
        self.items: Node | None = None
        self.min_items, self.max_items = 0, math.inf
        self.min_length, self.max_length = 0, math.inf
        self.pattern: Regex | StringRule | None = None
        self.range: NumberRange | None = None
        self.path = path

    def item(self, index: int) -> Node | None:
        """The schema of an array's ``index``-th item (None: no such item may be written)."""
        return self.prefix[index] if index < len(self.prefix) else self.items

    def required_items(self) -> range:
        """The indices whose item schemas an array of ``min_items`` items must satisfy: the prefix's, then one
        of ``items`` (all later ones share it), so a huge ``minItems`` is checked without counting to it."""
        return range(min(self.min_items, len(self.prefix) + 1))

    def __repr__(self) -> str:
        return f"Node({self.path or '#'})"


ANY = Node("")  # any JSON value
ANY.types, ANY.extra, ANY.items = frozenset(TYPES) - {"integer"}, ANY, ANY
OBJECT = Node("")  # any JSON object (``json_object``)
OBJECT.types, OBJECT.extra, OBJECT.items = frozenset({"object"}), ANY, ANY
for _n in (ANY, OBJECT):
    _n.leaves = (_n,)


@dataclass(frozen=True)
class Compiled:
    """A compiled schema: its ``root`` and the paths of the keywords it does not enforce."""

    root: Node
    unenforced: tuple[str, ...]


def compile_schema(schema: Any) -> Compiled:
    """Compile a JSON Schema (a dict or a boolean) into rules; see the module docstring.

    Raises:
        SchemaError: the schema is not valid JSON Schema, or no finite JSON value satisfies its enforced part.
    """
    compiler = _Compiler(schema)
    root = compiler.node(schema, "")
    if compiler.invalid:
        raise SchemaError(f"it is not a valid JSON Schema: {'; '.join(compiler.invalid)}")
    reason = compiler.finish(root)
    if reason is not None:
        raise SchemaError(f"no JSON value satisfies the schema: {reason}")
    return Compiled(root, tuple(compiler.problems))


def unenforced_keywords(schema: Any) -> list[str]:
    """Where ``schema`` asks more than decoding enforces, as paths (``"properties.tags.items.pattern"``)."""
    compiler = _Compiler(schema)
    compiler.node(schema, "")
    compiler.finish()
    return compiler.problems


def object_root(node: Node) -> Node:
    """``node`` narrowed to its object values (a tool call's arguments are an object whatever the schema says).

    Raises:
        SchemaError: the schema allows no object.
    """
    leaves = []
    for leaf in node.leaves:
        if leaf.types == {"object"} and not leaf.strings and not leaf.literals:
            leaves.append(leaf)
        elif "object" in leaf.types:
            narrowed = copy.copy(leaf)
            narrowed.types, narrowed.strings, narrowed.literals = frozenset({"object"}), None, ()
            narrowed.leaves = (narrowed,)
            leaves.append(narrowed)
    if not leaves:
        raise SchemaError("the schema allows no JSON object, and arguments are an object")
    union = Node(node.path)
    union.alts = union.leaves = tuple(leaves)
    return union


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _literal(value: Any) -> tuple[str, ...]:
    """The texts a number, boolean or null ``value`` may be written as."""
    text = json.dumps(value)
    if isinstance(value, bool) or value is None:
        return (text,)
    if isinstance(value, int):
        return text, text + ".0"
    return (text, str(int(value))) if value.is_integer() else (text,)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", dict: "object", list: "array"}.get(type(value), "")


class _Compiler:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.memo: dict[int, Node] = {}  # id of a schema dict -> its node (so that recursion makes cycles)
        self.nodes: list[Node] = []
        self.problems: list[str] = []
        self.invalid: list[str] = []  # values JSON Schema itself does not allow, each "path: why"
        self.one_of: list[tuple[Node, str]] = []  # oneOf unions, checked for overlapping alternatives at the end
        self.depth = 0  # schemas being compiled, one inside the other

    def new(self, path: str) -> Node:
        node = Node(path)
        self.nodes.append(node)
        return node

    def node(self, schema: Any, path: str) -> Node:
        if schema is True:
            return ANY
        if schema is False:
            return self.new(path)  # no leaves: nothing satisfies it
        if not isinstance(schema, dict):
            self.refuse(path, f"a schema is an object or a boolean, not {schema!r}")
            return ANY
        if id(schema) in self.memo:
            return self.memo[id(schema)]
        if self.depth >= MAX_DEPTH:
            where = path if len(path) <= 120 else f"{path[:50]} ... {path[-50:]}"
            raise SchemaError(f"{where or 'the root'}: the schema nests more than {MAX_DEPTH} levels deep (subschemas "
                              "and $ref chains); flatten it, or reuse a level through a recursive $ref")
        self.depth += 1
        try:
            return self.compile(schema, path)
        finally:
            self.depth -= 1

    def compile(self, schema: dict, path: str) -> Node:
        node = self.new(path)
        self.memo[id(schema)] = node
        keywords = {k for k in schema if k not in ANNOTATIONS}
        self.problems += [_join(path, k) for k in schema if k not in _ENFORCED | ANNOTATIONS]
        alone = keywords <= {"$ref", "anyOf", "oneOf", "allOf"} and len(keywords) == 1  # a pure union or alias
        if "$ref" in schema:
            target = self.resolve(schema["$ref"], _join(path, "$ref"))
            if alone:
                node.alts = (target,)
                return node
            self.problems.append(_join(path, "$ref") + " (beside other keywords)")
        for union in ("anyOf", "oneOf"):
            if union in schema:
                where = _join(path, union)
                members = schema[union]
                if not isinstance(members, list) or not members:
                    self.refuse(where, "must be a non-empty list of schemas")
                    continue
                if not alone:
                    self.problems.append(where + " (beside other keywords)")
                    continue
                node.alts = tuple(self.node(m, f"{where}.{i}") for i, m in enumerate(members))
                if union == "oneOf":
                    self.one_of.append((node, where))
                return node
        if "allOf" in schema:
            where = _join(path, "allOf")
            members = schema["allOf"]
            if not isinstance(members, list) or not members:
                self.refuse(where, "must be a non-empty list of schemas")
                members = []
            kept = [(i, m) for i, m in enumerate(members)
                    if m is not True and not (isinstance(m, dict) and set(m) <= ANNOTATIONS)]
            if alone and len(kept) == 1:
                node.alts = (self.node(kept[0][1], f"{where}.{kept[0][0]}"),)
                return node
            if alone and not kept:
                node.alts = (ANY,)
                return node
            self.problems.append(where)
        self.leaf(node, schema, path)
        return node

    def resolve(self, ref: Any, where: str) -> Node:
        """The node of a local JSON-pointer ``$ref`` (any other: a problem, and any value)."""
        if not isinstance(ref, str):
            self.refuse(where, f"a reference is a string (a URI), not {ref!r}")
            return ANY
        if not ref.startswith("#"):
            self.problems.append(f"{where} (only local references, '#...', are resolved)")
            return ANY
        target, path = self.root, ""
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                self.refuse(where, f"{ref!r} points to nothing in the schema")
                return ANY
            path = _join(path, part)
        return self.node(target, path)

    def leaf(self, node: Node, schema: Mapping[str, Any], path: str) -> None:
        types = schema.get("type", list(TYPES))
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in TYPES for t in types):
            self.refuse(_join(path, "type"), f"{schema['type']!r} is not a JSON type or a non-empty list of them "
                                            f"({', '.join(TYPES)})")
            types = list(TYPES)
        kinds = set(types) - ({"integer"} if "number" in types else set())
        node.types = frozenset(kinds)
        node.min_length, node.max_length = self.bounds(schema, "minLength", "maxLength", path)
        node.min_items, node.max_items = self.bounds(schema, "minItems", "maxItems", path)
        if kinds & {"number", "integer"}:  # the numeric keywords apply to numbers only, pattern and format to strings
            node.range, bad = NumberRange.from_schema(schema, "integer" in kinds)
            for key in bad:
                name = key.split(" ")[0]
                why = key[len(name):].strip(" ()") or (f"{schema[name]!r} is not a number" + (
                    " above 0" if name == "multipleOf" else ""))
                self.refuse(_join(path, name), why)
        node.pattern = self.pattern(schema, path, node.min_length, node.max_length) if "string" in kinds else \
            None
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            self.refuse(_join(path, "properties"), "must be an object of schemas by property name")
            props = {}
        node.properties = {k: self.node(v, f"{_join(path, 'properties')}.{k}") for k, v in props.items()}
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            self.refuse(_join(path, "required"), f"must be a list of property names, not {required!r}")
        node.required = frozenset(k for k in required if isinstance(k, str)) if isinstance(required, list) else \
            frozenset()
        extra = schema.get("additionalProperties", True)
        node.extra = None if extra is False else self.node(extra, _join(path, "additionalProperties"))
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 7's tuple form
            node.prefix = tuple(self.node(s, f"{_join(path, 'items')}.{i}") for i, s in enumerate(items))
            items = schema.get("additionalItems", True)
        elif "prefixItems" in schema:
            prefix = schema["prefixItems"] if isinstance(schema["prefixItems"], list) else []
            node.prefix = tuple(self.node(s, f"{_join(path, 'prefixItems')}.{i}") for i, s in enumerate(prefix))
        node.items = None if items is False else self.node(items, _join(path, "items"))
        if "const" in schema or "enum" in schema:
            self.values(node, schema, path)

    def pattern(self, schema: Mapping[str, Any], path: str, low: int, high: float) -> Regex | StringRule | None:
        """The automaton of a string schema's ``pattern`` and ``format`` (None: none, or none enforced), the length
        bounds ``low``..``high`` folded in when there is one (so that all are checked together)."""
        found = []
        if "pattern" in schema:
            try:
                if not isinstance(schema["pattern"], str):
                    self.refuse(_join(path, "pattern"), f"a pattern is a string, not {schema['pattern']!r}")
                else:
                    found.append((f"pattern {schema['pattern']!r}", Regex(schema["pattern"])))
            except PatternError as exc:
                if _no_regex(schema["pattern"]):
                    self.refuse(_join(path, "pattern"), f"{schema['pattern']!r} is not a regular expression ({exc})")
                else:  # valid, but outside the subset decoded
                    self.problems.append(f"{_join(path, 'pattern')} ({exc})")
        if "format" in schema:
            regex = format_regex(schema["format"]) if isinstance(schema["format"], str) else None
            if not isinstance(schema["format"], str):
                self.refuse(_join(path, "format"), f"a format is a name, not {schema['format']!r}")
            elif regex is None:
                self.problems.append(f"{_join(path, 'format')} ({schema['format']!r} is not a format enforced)")
            else:
                found.append((f"format {schema['format']!r}", regex))
        lengths = ([f"minLength {low}"] if low else []) + ([f"maxLength {high}"] if high != math.inf else [])
        if len(found) == 1 and not lengths:
            return found[0][1]
        if not found:
            return None
        words = [w for w, _ in found] + lengths
        source = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        try:
            return StringRule([r for _, r in found], low, high, source)
        except PatternError as exc:
            self.problems.append(f"{_join(path, 'pattern' if 'pattern' in schema else 'format')} ({exc}; left "
                                 "unenforced)")
            return None

    def refuse(self, path: str, why: str) -> None:
        self.invalid.append(f"{path or 'the root'}: {why}")

    def bounds(self, schema: Mapping[str, Any], low: str, high: str, path: str) -> tuple[int, float]:
        out = []
        for key, default in ((low, 0), (high, math.inf)):
            value = schema.get(key, default)
            if isinstance(value, float) and value.is_integer():  # 2.0 is the integer 2 in JSON Schema
                value = int(value)
            if value is not default and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                self.refuse(_join(path, key), f"must be a non-negative integer, not {value!r}")
                value = default
            out.append(value)
        return out[0], out[1]

    def values(self, node: Node, schema: Mapping[str, Any], path: str) -> None:
        """Turn ``node`` into a union of its enum/const values (filtered by its type and length bounds)."""
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list):
            self.refuse(_join(path, "enum"), f"must be a list of values, not {values!r}")
            return
        if "const" in schema and isinstance(schema.get("enum"), list):
            values = [v for v in values if any(_same(v, e) for e in schema["enum"])]
        beside = [k for k in schema if k not in _BESIDE_ENUM | ANNOTATIONS | {"enum", "const"}]
        if beside:
            self.problems.append(_join(path, "enum" if "enum" in schema else "const") +
                                 f" (beside {', '.join(beside)})")
        kept = []
        for value in values:
            kind = _json_type(value)
            if kind not in node.types and not (kind == "integer" and "number" in node.types):
                continue
            if kind == "string" and not (node.min_length <= len(value) <= node.max_length and
                                         (node.pattern is None or node.pattern.matches(value))):
                continue
            if kind in ("integer", "number") and node.range is not None and not node.range.holds(json.dumps(value)):
                continue
            kept.append(value)
        scalars = self.new(path)
        scalars.strings = frozenset(v for v in kept if isinstance(v, str)) or None
        scalars.literals = tuple(t for v in kept if not isinstance(v, (str, dict, list)) for t in _literal(v))
        alts = [scalars] if scalars.strings or scalars.literals else []
        alts += [self.constant(v, path) for v in kept if isinstance(v, (dict, list))]
        fresh = Node(path)
        for slot in Node.__slots__:  # the node becomes the union (its identity is kept for recursion)
            setattr(node, slot, getattr(fresh, slot))
        node.alts = tuple(alts)

    def constant(self, value: Any, path: str) -> Node:
        """A node that only ``value`` (an object or array, to any depth) satisfies."""
        node = self.new(path)
        if isinstance(value, dict):
            node.types = frozenset({"object"})
            node.properties = {k: self.constant(v, path) for k, v in value.items()}
            node.required = frozenset(value)
        elif isinstance(value, list):
            node.types = frozenset({"array"})
            node.prefix = tuple(self.constant(v, path) for v in value)
            node.min_items = node.max_items = len(value)
        elif isinstance(value, str):
            node.strings = frozenset({value})
        else:
            node.literals = _literal(value)
        return node

    # -- after compiling: which parts some finite value satisfies, and pruning the rest --

    def finish(self, root: Node | None = None) -> str | None:
        """Prune what no finite value satisfies; if ``root`` is all such, why (else None)."""
        nodes = self.nodes
        closure = {id(n): self.closure(n) for n in nodes if n.alts is not None}
        sat: set[int] = {id(ANY), id(OBJECT)}

        def ok(n: Node | None) -> bool:
            if n is None:
                return False
            if n.alts is None:
                return id(n) in sat
            return any(id(leaf) in sat for leaf in closure[id(n)])

        changed = True
        while changed:
            changed = False
            for n in nodes:
                if n.alts is None and id(n) not in sat and self.kinds(n, ok):
                    sat.add(id(n))
                    changed = True
        if root is not None and not ok(root):
            return self.why(root, ok, set())
        for n in nodes:
            if n.alts is not None:
                n.leaves = tuple(leaf for leaf in closure[id(n)] if id(leaf) in sat)
                continue
            n.types = frozenset(self.kinds(n, ok) & n.types)
            n.leaves = (n,) if id(n) in sat else ()
            n.extra = n.extra if ok(n.extra) else None
            n.keys = tuple(k for k, v in n.properties.items() if ok(v))
            items = n.max_items
            for i in range(len(n.prefix)):
                if not ok(n.prefix[i]):
                    items = min(items, i)
                    break
            if not ok(n.items):
                n.items = None
                items = min(items, len(n.prefix))
            n.max_items = items
        for node, where in self.one_of:
            alts = [(i, a) for i, a in enumerate(node.alts)
                    if any(id(leaf) in sat for leaf in closure.get(id(a), (a,)))]
            pair = next(((i, j) for k, (i, a) in enumerate(alts) for j, b in alts[k + 1:] if not _disjoint(a, b, 3)),
                        None)
            if pair is not None:
                self.problems.append(f"{where} (alternatives {pair[0]} and {pair[1]} may both hold, so 'exactly one' "
                                     "cannot be enforced: it would be decoded as anyOf; write anyOf if both may "
                                     "hold, or tell them apart by type, const/enum values or a required property "
                                     "whose values differ)")
        return None

    def kinds(self, n: Node, ok) -> set[str]:
        """The kinds of value a leaf has some finite value of, given which nodes are known satisfiable."""
        out = set()
        for t in n.types:
            if t == "object":
                if all(ok(n.properties[k]) if k in n.properties else ok(n.extra) for k in n.required):
                    out.add(t)
            elif t == "array":
                if n.min_items <= n.max_items and all(ok(n.item(i)) for i in n.required_items()):
                    out.add(t)
            elif t == "string":
                if n.min_length <= n.max_length and (n.pattern is None or n.pattern.start):
                    out.add(t)
            elif t not in ("number", "integer") or n.range is None or not n.range.empty:
                out.add(t)
        if n.strings or n.literals:
            out.add("values")
        return out

    def closure(self, node: Node) -> tuple[Node, ...]:
        """The leaves reachable from a union through unions (a cycle of unions adds nothing)."""
        seen, out, todo = set(), {}, [node]
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.alts is None:
                out[id(n)] = n
            else:
                todo.extend(reversed(n.alts))
        return tuple(out.values())

    def why(self, node: Node, ok, seen: set[int]) -> str:
        """Where and why ``node`` (found unsatisfiable) has no finite value: the first cause met on its
        required parts."""
        where = node.path or "the root"
        if id(node) in seen:
            return f"{where} can only be written by containing itself, forever"
        seen.add(id(node))
        if node.alts is not None:
            leaves = self.closure(node)
            if not node.alts:
                return f"{where}: none of its enum/const values has the allowed type and length"
            if not leaves:
                chain, n = [node], node
                while n.alts and n.alts[0].alts is not None and n.alts[0] not in chain:
                    n = n.alts[0]
                    chain.append(n)
                cycle = " -> ".join(c.path or "#" for c in chain)
                return f"{cycle}: a reference cycle that consumes no input (its $ref/anyOf lead only to each other, " \
                       "never to a schema with content)"
            return self.why(leaves[0], ok, seen)
        if not node.types:
            return f"{where}: the schema is false, or its type list is empty"
        for t in sorted(node.types):
            if t == "object":
                for key in sorted(node.required):
                    value = node.properties.get(key, node.extra)
                    if value is None:
                        return f"{where}: required property {key!r} may not appear (additionalProperties is false)"
                    if not ok(value):
                        return self.why(value, ok, seen)
            elif t == "array":
                if node.min_items > node.max_items:
                    return f"{where}: minItems {node.min_items} is above maxItems {node.max_items}"
                for i in node.required_items():
                    item = node.item(i)
                    if item is None:
                        return f"{where}: minItems {node.min_items}, but only {len(node.prefix)} items may be written"
                    if not ok(item):
                        return self.why(item, ok, seen)
            elif t == "string":
                if isinstance(node.pattern, StringRule) and not node.pattern.start:
                    return f"{where}: no string satisfies its {node.pattern.source} at once"
                if node.pattern is not None and not node.pattern.start:
                    return f"{where}: its pattern or format {node.pattern.source!r} matches no string"
                return f"{where}: minLength {node.min_length} is above maxLength {node.max_length}"
            elif t in ("number", "integer"):
                return f"{where}: its minimum/maximum/exclusive*/multipleOf allow no {t}"
        return f"{where} has no finite value"


def _no_regex(pattern: str) -> bool:
    """Whether ``pattern`` is no regular expression at all: Python's parser refuses it for a reason ECMA-262's
    refuses it too (an unclosed group, a range out of order, nothing to repeat). Where the dialects differ (escapes
    Python lacks such as ``\\p{L}``, a class escape as a range's end, ECMA's empty classes ``[]`` and ``[^]``) the
    pattern is taken as valid, and left unenforced."""
    try:
        re.compile(pattern)
    except re.error as exc:
        if "bad escape" in str(exc) and "end of pattern" not in str(exc):
            return False
        if "bad character range" in str(exc) and re.search(r"\\[dDwWsS]-|-\\[dDwWsS]", pattern):
            return False
        return not ("unterminated character set" in str(exc) and ("[]" in pattern or "[^]" in pattern))
    except (OverflowError, RecursionError):
        return False
    return False


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and _json_type(a) == _json_type(b)


def _value_kinds(leaf: Node) -> dict[str, set[str] | None]:
    """kind -> the values of that kind a leaf takes (None: any value of the kind)."""
    out: dict[str, set[str] | None] = {t if t != "integer" else "number": None for t in leaf.types}
    if leaf.strings and "string" not in out:
        out["string"] = set(leaf.strings)
    for text in leaf.literals:
        kind = {"t": "boolean", "f": "boolean", "n": "null"}.get(text[0], "number")
        if kind not in out:
            out[kind] = set()
        if out[kind] is not None:
            out[kind].add(str(json.loads(text)))  # 1 and 1.0 are the same value
    return out


def _disjoint(a: Node, b: Node, depth: int) -> bool:
    """Whether no value satisfies both ``a`` and ``b`` (False when unsure)."""
    for x in a.leaves:
        for y in b.leaves:
            kx, ky = _value_kinds(x), _value_kinds(y)
            for kind in kx.keys() & ky.keys():
                vx, vy = kx[kind], ky[kind]
                if vx is not None and vy is not None:
                    if vx & vy:
                        return False
                elif kind in ("string", "number"):
                    allowed = _string_allowed if kind == "string" else _number_allowed
                    if vx is not None or vy is not None:  # some values against a whole kind's rules
                        values, other = (vx, y) if vx is not None else (vy, x)
                        if any(allowed(other, v) for v in values):
                            return False
                    elif not (_strings_apart if kind == "string" else _numbers_apart)(x, y):
                        return False
                elif kind != "object" or depth == 0:
                    return False
                elif not any(k in x.properties and k in y.properties and
                             _disjoint(x.properties[k], y.properties[k], depth - 1) for k in x.required & y.required):
                    return False
    return True


def _string_allowed(leaf: Node, value: str) -> bool:
    return leaf.min_length <= len(value) <= leaf.max_length and (leaf.pattern is None or leaf.pattern.matches(value))


def _number_allowed(leaf: Node, value: str) -> bool:
    if "number" not in leaf.types and Fraction(value).denominator != 1:
        return False
    return leaf.range is None or leaf.range.holds(value)


def _strings_apart(x: Node, y: Node) -> bool:
    """Whether no string satisfies both leaves' string rules (their length bounds and patterns together)."""
    low, high = max(x.min_length, y.min_length), min(x.max_length, y.max_length)
    if low > high:
        return True
    regexes = [r for leaf in (x, y) for r in (leaf.pattern.regexes if isinstance(leaf.pattern, StringRule) else
                                              [leaf.pattern] if leaf.pattern is not None else [])]
    if not regexes:
        return False
    try:
        return StringRule(regexes, low, high, "oneOf alternatives").start is None
    except PatternError:
        return False


def _numbers_apart(x: Node, y: Node) -> bool:
    """Whether the leaves' numeric bounds leave no number between them (``multipleOf`` not considered)."""
    if x.range is None or y.range is None:
        return False
    ranges = (x.range, y.range)
    lows = [(r.low, r.low_open) for r in ranges if r.low is not None]
    highs = [(r.high, r.high_open) for r in ranges if r.high is not None]
    if not lows or not highs:
        return False
    low, high = max(lows, key=lambda b: (b[0], b[1])), min(highs, key=lambda b: (b[0], not b[1]))
    return low[0] > high[0] or (low[0] == high[0] and (low[1] or high[1]))
