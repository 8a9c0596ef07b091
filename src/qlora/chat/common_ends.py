"""How far two sequences (token ids, texts) agree from their start and from their end: where a prompt's
tokens or text stop being shared with a whole conversation's, or a turn's with the one after it."""

from __future__ import annotations

from typing import Sequence


def common_prefix(a: Sequence, b: Sequence) -> int:
    """The length of the longest prefix ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def common_suffix(a: Sequence, b: Sequence) -> int:
    """The length of the longest suffix ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n
