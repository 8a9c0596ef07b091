"""Guided decoding writes characters the vocabulary holds only in pieces: SentencePiece byte-fallback tokens
(``<0xE6>``) and byte-level BPE tokens that end inside a character.

Oracles: Python's incremental UTF-8 decoder and ``str.encode`` (partial sequences).
"""

from __future__ import annotations

import codecs
import functools
import random

from qlora.infer.utf8 import span, split


@functools.lru_cache(maxsize=1)
def _partials() -> dict[bytes, tuple[int, int]]:
    """Each proper prefix of a character's UTF-8 encoding: the lowest and highest code point it begins (beyond the
    BMP every 7th code point: every prefix is still seen, its range only roughly)."""
    out: dict[bytes, tuple[int, int]] = {}
    for code in [*range(0x80, 0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 7), 0x10FFFF]:
        data = chr(code).encode()
        for k in range(1, len(data)):
            low, high = out.get(data[:k], (code, code))
            out[data[:k]] = (min(low, code), max(high, code))
    return out


def test_span_is_the_code_points_a_partial_sequence_completes_to():
    expected = _partials()
    for partial, (low, high) in expected.items():
        got = span(partial)
        assert got is not None and got[0] <= low and high <= got[1], partial
        assert chr(got[0]).encode().startswith(partial) and chr(got[1]).encode().startswith(partial)
        if partial[0] < 0xF0:  # every code point enumerated: exact
            assert got == (low, high), partial
    for a in range(256):
        for tail in ((), *((b,) for b in range(256))):
            partial = bytes([a, *tail])
            if partial not in expected:
                assert span(partial) is None, partial


def test_split_is_the_incremental_decoder():
    """Whole characters as Python's incremental decoder gives them; the tail kept when some character completes it
    (that decoder, lax there, also keeps a surrogate's first two bytes)."""
    rng = random.Random(0)
    pieces = ["a", "é", "日", "\U0001f642", "\x00", "\ud7ff", "\ue000"]
    for _ in range(4000):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))).encode()
        data = data[:rng.randint(0, len(data))]
        if rng.random() < 0.4:
            at = rng.randint(0, len(data))
            data = data[:at] + bytes([rng.randrange(256)]) + data[at:]
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
        except UnicodeDecodeError:
            assert split(data) is None, data
            continue
        tail = data[len(text.encode()):]
        assert split(data) == ((text, tail) if not tail or tail in _partials() else None), data
