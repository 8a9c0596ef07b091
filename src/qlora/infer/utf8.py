"""Text as UTF-8 bytes arrive: whole characters, and what a character begun but not finished may still be.

Tokenizers do not always cut text between characters: SentencePiece's byte fallback writes a
character outside the vocabulary as ``<0xNN>`` tokens, and byte-level BPE may end a token inside a
character. A constraint reading a reply token by token therefore reads bytes: the whole characters
go to its automaton, and a trailing partial sequence is kept while some character can complete it.
The code points one partial sequence can become are one contiguous range (its lead byte fixes the
length and high bits; each continuation byte fixes six more), so "may it go on" is one range query.
"""

from __future__ import annotations

# (length, smallest and largest code point of that length) by lead byte; strict UTF-8: no overlong forms
_LENGTHS = ((0xC2, 0xDF, 2, 0x80, 0x7FF), (0xE0, 0xEF, 3, 0x800, 0xFFFF), (0xF0, 0xF4, 4, 0x10000, 0x10FFFF))
_SURROGATES = (0xD800, 0xDFFF)


def span(partial: bytes) -> tuple[int, int] | None:
    """The code points (lowest, highest) whose UTF-8 encoding begins with ``partial``, a lead byte and fewer
    continuation bytes than it needs; None when no valid character does (a stray continuation byte, an overlong
    or surrogate form, past U+10FFFF)."""
    if not partial:
        return None
    lead = partial[0]
    for low_byte, high_byte, length, smallest, largest in _LENGTHS:
        if low_byte <= lead <= high_byte:
            break
    else:
        return None
    rest = partial[1:]
    if len(rest) >= length - 1 or any(not 0x80 <= b <= 0xBF for b in rest):
        return None
    code = lead & (0x7F >> length)
    for b in rest:
        code = code << 6 | (b & 0x3F)
    missing = 6 * (length - 1 - len(rest))
    low, high = max(code << missing, smallest), min((code << missing) | ((1 << missing) - 1), largest)
    if _SURROGATES[0] <= high <= _SURROGATES[1]:
        high = _SURROGATES[0] - 1
    if _SURROGATES[0] <= low <= _SURROGATES[1]:
        low = _SURROGATES[1] + 1
    return (low, high) if low <= high else None


def split(data: bytes) -> tuple[str, bytes] | None:
    """``data`` as its whole characters and a trailing partial sequence that some character completes (``b""``:
    none); None when it is not such a prefix of valid UTF-8."""
    cut = len(data)
    for back in range(1, min(3, len(data)) + 1):  # a partial sequence is at most 3 bytes, ending the data
        b = data[-back]
        if b < 0x80:
            break
        if b >= 0xC0:  # its lead byte: the sequence is partial when it needs more than ``back`` bytes
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            if need > back:
                cut = len(data) - back
            break
    head, tail = data[:cut], data[cut:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if tail and span(tail) is None:
        return None
    return text, tail
