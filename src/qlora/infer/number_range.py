"""Numeric bounds (``minimum``, ``maximum``, ``exclusive*``, ``multipleOf``) checked on a number's prefix.

``exclusiveMinimum``/``exclusiveMaximum`` are numbers (draft 6 on) or, as in draft 4, booleans
that make ``minimum``/``maximum`` exclusive (``true`` without that bound is malformed).

A prefix of a JSON number is allowed iff some way of finishing it lands on an allowed
value: ``12`` may become 12, 120..129, 1200..1299, ... (or, not an integer, anything in
[12, 13), [120, 130), ...), ``-0.5`` anything in (-0.6, -0.5], and so on; so decoding never
writes digits that can only end out of range. Values are compared exactly, as the decimals
they are written as (bounds as the schema writes them: ``0.1`` is one tenth).

Written forms, so that each prefix has a closed-form set of completions: a bounded number is
written without an exponent (every JSON number has such a form), and under ``multipleOf``
with fraction digits beyond the multiple's own only zeros (``1.50`` for 1.5 with
``multipleOf: 0.5``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping

KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _number(value: Any) -> Fraction | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        return None
    return Fraction(json.dumps(value))


@dataclass(frozen=True)
class NumberRange:
    """The numbers a schema allows: bounds (None: unbounded; ``*_open``: exclusive), and, when values are
    discrete, ``digits`` (fraction digits a value has at most; None: any decimal) and ``step`` (values are
    multiples of ``step / 10**digits``)."""

    low: Fraction | None
    low_open: bool
    high: Fraction | None
    high_open: bool
    digits: int | None
    step: int

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], integer: bool) -> tuple["NumberRange | None", list[str]]:
        """The range ``schema`` asks of numbers (``integer``: of integers only), None if it asks nothing, and
        the keywords it gives malformed values (left out)."""
        bad, found, draft4 = [], {}, {}
        for key in KEYWORDS:
            if key in schema:
                if key.startswith("exclusive") and isinstance(schema[key], bool):  # draft 4: makes its bound open
                    draft4[key] = schema[key]
                    continue
                value = _number(schema[key])
                if value is None or (key == "multipleOf" and value <= 0):
                    bad.append(key)
                else:
                    found[key] = value
        for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if draft4.get(key) and bound not in found:
                bad.append(f"{key} (true, as draft 4 writes it, needs {bound} beside it)")
        if not found:
            return None, bad
        low, low_open = found.get("minimum"), bool(draft4.get("exclusiveMinimum"))
        high, high_open = found.get("maximum"), bool(draft4.get("exclusiveMaximum"))
        if "exclusiveMinimum" in found and (low is None or found["exclusiveMinimum"] >= low):
            low, low_open = found["exclusiveMinimum"], True
        if "exclusiveMaximum" in found and (high is None or found["exclusiveMaximum"] <= high):
            high, high_open = found["exclusiveMaximum"], True
        multiple = found.get("multipleOf")
        if integer:
            return cls(low, low_open, high, high_open, 0, multiple.numerator if multiple else 1), bad
        if multiple is None:
            return cls(low, low_open, high, high_open, None, 1), bad
        digits = 0  # a JSON number is a decimal: its denominator divides some power of ten
        while 10 ** digits % multiple.denominator:
            digits += 1
        return cls(low, low_open, high, high_open, digits, int(multiple * 10 ** digits)), bad

    def holds(self, text: str) -> bool:
        """Whether the number ``text`` (a whole JSON number) is allowed."""
        value = Fraction(text)
        if self.low is not None and (value < self.low or value == self.low and self.low_open):
            return False
        if self.high is not None and (value > self.high or value == self.high and self.high_open):
            return False
        if self.digits is None:
            return True
        scaled = value * 10 ** self.digits
        return scaled.denominator == 1 and scaled.numerator % self.step == 0

    @property
    def empty(self) -> bool:
        """Whether no number is allowed."""
        return not self.viable("") and not self.viable("-")

    def viable(self, text: str) -> bool:
        """Whether the number prefix ``text`` (``-?(0|[1-9][0-9]*)(\\.[0-9]*)?``, or empty) can be finished
        into an allowed number."""
        negative = text.startswith("-")
        body = text[1:] if negative else text
        low, low_open, high, high_open = self.low, self.low_open, self.high, self.high_open
        if negative:  # -x allowed iff x is allowed by the bounds mirrored
            low, low_open, high, high_open = (None if high is None else -high), high_open, \
                (None if low is None else -low), low_open
        if self.digits is None:
            return _dense(body, None if low is None else (low, low_open), None if high is None else (high, high_open))
        scale = 10 ** self.digits
        first = None if low is None else _ceil(low * scale) + (1 if low_open and (low * scale).denominator == 1 else 0)
        last = None if high is None else _floor(high * scale) - (1 if high_open and (high * scale).denominator == 1
                                                                  else 0)
        return _discrete(body, self.digits, self.step, first, last)


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _floor(x: Fraction) -> int:
    return x.numerator // x.denominator


def _dense(body: str, low, high) -> bool:
    """Whether a decimal >= 0 written beginning with ``body`` lies within ``low``..``high`` ((bound, open) or
    None)."""

    if low is not None and high is not None and (low[0] > high[0] or low[0] == high[0] and (low[1] or high[1])):
        return False

    def meets(a: Fraction, b: Fraction | None) -> bool:  # [a, b) against the bounds
        if high is not None and (a > high[0] or a == high[0] and high[1]):
            return False
        return low is None or b is None or b > low[0]

    if body == "":
        return meets(Fraction(0), None)
    whole, dot, fraction = body.partition(".")
    if dot:
        value = Fraction(int(whole + fraction), 10 ** len(fraction))
        return meets(value, value + Fraction(1, 10 ** len(fraction)))
    if whole == "0":
        return meets(Fraction(0), Fraction(1))
    n, scale = int(whole), 1
    while True:  # n, then n0..n9, n00..n99, ...: the first span reaching past low decides
        a, b = Fraction(n * scale), Fraction((n + 1) * scale)
        if low is None or b > low[0]:
            return meets(a, b)
        scale *= 10


def _discrete(body: str, digits: int, step: int, first: int | None, last: int | None) -> bool:
    """Whether a number >= 0 written beginning with ``body``, scaled by ``10**digits`` (an integer), lies in
    ``first``..``last`` and is a multiple of ``step``."""

    def hits(a: int, b: int | None) -> bool:
        lo = a if first is None else max(a, first)
        hi = b if last is None else last if b is None else min(b, last)
        candidate = -((-lo) // step) * step
        return hi is None or candidate <= hi

    scale = 10 ** digits
    if body == "":
        return hits(0, None)
    whole, dot, fraction = body.partition(".")
    if dot:
        if any(c != "0" for c in fraction[digits:]):
            return False
        kept = fraction[:digits]
        start = int(whole + kept) * 10 ** (digits - len(kept))
        return hits(start, start + 10 ** (digits - len(kept)) - 1)
    if whole == "0":
        return hits(0, scale - 1)
    n = int(whole)
    while True:  # n, then n0..n9, ...: past ``last`` no span hits; without ``last``, a wide enough one does
        a, b = n * scale, (n + 1) * scale - 1
        if last is not None and a > last:
            return False
        if hits(a, b):
            return True
        scale *= 10
