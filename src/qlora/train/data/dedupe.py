"""Exact deduplication of tokenized examples, as axolotl's ``dataset_exact_deduplication``.

axolotl hashes each prepared row (an SFT row's token ids, labels and the columns derived from them; a preference
row's prompt and answers) and keeps the first of equal rows, in order; held-out rows never repeat a training row
(SFT: it deduplicates before the ``val_set_size`` split; preference methods: the eval rows are checked against the
training rows). Two examples are therefore duplicates here when their tokens and what is trained of them are equal
(an SFT example's ids and labels; a pair's prompt, answers and trained answer tokens; an unpaired example's prompt,
completion and label). An example with images is never dropped: equal image tokens may stand for other pixels
(axolotl's vision configs skip the preparation its deduplication runs in).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

Unit = TypeVar("Unit")
# Fields of a tokenized example that are not what it trains on: its row number, a flag, later reference log-probs
# and KL partners.
_NOT_CONTENT = frozenset({"index", "truncated", "ref_logps", "kl_pair_ids", "media", "image_tokens", "reasoning_hidden",
                          "system_dropped"})


def drop_duplicates(units: list[Unit], seen: set[tuple]) -> list[Unit]:
    """``units`` (tokenized examples, pairs or unpaired examples) without those equal to an earlier one or to
    one whose key is in ``seen`` (those kept before), in order; ``seen`` gains the keys of those kept."""
    kept = []
    for unit in units:
        if getattr(unit, "media", None):
            kept.append(unit)
            continue
        key = tuple(_hashable(getattr(unit, f.name)) for f in fields(unit) if f.name not in _NOT_CONTENT)
        if key not in seen:
            seen.add(key)
            kept.append(unit)
    return kept


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value
