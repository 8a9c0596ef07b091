"""The loss mask of a tokenized example read back as its trained token runs (test helper)."""

from __future__ import annotations

from qlora.train.data import IGNORE_INDEX


def trained_runs(input_ids, labels) -> list[list[int]]:
    """Consecutive runs of tokens whose label is trained, in order."""
    out, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    return out + ([current] if current else [])
