"""Exact deduplication of tokenized examples, as axolotl's ``dataset_exact_deduplication``.

axolotl hashes each prepared row (its token ids, labels and the columns derived from them) and keeps the first
of equal rows, in order; rows held out by ``val_set_size`` never repeat a training row (it deduplicates before
the split). Two examples are therefore duplicates here when their token ids and labels are equal: the same text
trained on the same tokens. An example with images is never dropped: equal image tokens may stand for other
pixels (axolotl's vision configs skip the preparation its deduplication runs in).
"""

from __future__ import annotations

from qlora.train.data.tokenize import TokenizedExample


def drop_duplicates(examples: list[TokenizedExample], seen: set[tuple]) -> list[TokenizedExample]:
    """``examples`` without those equal to an earlier one or to one in ``seen`` (the keys of examples kept
    before), in order; ``seen`` gains the keys of those kept."""
    kept = []
    for example in examples:
        if example.media:
            kept.append(example)
            continue
        key = (tuple(example.input_ids), tuple(example.labels))
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept
