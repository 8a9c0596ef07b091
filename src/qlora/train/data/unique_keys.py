"""JSON data whose objects name a key twice, refused rather than read as Python's ``json`` reads them.

``json.loads('{"text": "a", "text": "b"}')`` keeps the last value without a word, so a producer's bug (two
columns mapped to one name, a merge that appended instead of replacing) would train half of a row. ``datasets``
(pyarrow's JSON reader) refuses such a JSON Lines row too. The check costs one Python call per object while
parsing, a few microseconds a row; finding where the object starts in a whole ``.json`` document uses Python's
slower pure-Python scanner, on that error path only.

``NaN`` (not JSON, but what Python's ``json.dumps`` writes for a pandas gap) is read as null, as ``datasets``
reads it in a column that also holds text: a missing value, not the number, so a NaN ``system`` or ``completion``
is treated as an absent one rather than refused as a number.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from typing import Any


class DuplicateKey(ValueError):
    """An object names ``key`` twice; ``pos`` is the offset of its ``{`` when :func:`duplicate_line` looked for it."""

    def __init__(self, key: str, pos: int | None = None):
        super().__init__(f"key {key!r} given twice")
        self.key, self.pos = key, pos


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _constant(name: str) -> float | None:
    """``NaN`` as null (a gap); ``Infinity`` and ``-Infinity`` as the numbers."""
    return None if name == "NaN" else float(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_constant=_constant)


def loads_unique(text: str) -> Any:
    """``json.loads(text)`` (``NaN`` as null), raising :class:`DuplicateKey` for an object that names a key twice."""
    return _DECODER.decode(text)


def loads_unique_prefix(text: str, start: int = 0) -> tuple[Any, int]:
    """The JSON value starting at ``text[start]`` and where it ends, as :func:`loads_unique` reads it (one of
    several objects written one after another)."""
    return _DECODER.raw_decode(text, start)


class _LocatingDecoder(json.JSONDecoder):
    """The pure-Python scanner, whose object parser can be wrapped to learn where the offending object starts."""

    def __init__(self) -> None:
        super().__init__(object_pairs_hook=_unique)

        def parse_object(s_and_end: tuple[str, int], *args: Any) -> Any:
            try:
                return json.decoder.JSONObject(s_and_end, *args)
            except DuplicateKey as exc:
                if exc.pos is None:  # the innermost object's wrapper sees it first
                    exc.pos = s_and_end[1] - 1
                raise

        self.parse_object = parse_object
        self.scan_once = json.scanner.py_make_scanner(self)


def duplicate_line(text: str) -> tuple[int, str]:
    """The line where the object that :func:`loads_unique` refused in ``text`` starts, and the key it names twice."""
    try:
        _LocatingDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except DuplicateKey as exc:
        return text.count("\n", 0, exc.pos) + 1, exc.key
    raise ValueError("no object in the text names a key twice")
