"""Packing short examples into rows of ``seq_len`` tokens without cross-talk.

A packed row holds several examples back to back. Two things keep each one
exactly as if it were alone (verified in tests/test_data_packing.py, per-example
loss packed vs unpacked within 1e-4 in fp32):

- ``position_ids`` restart at 0 for each example, so rotary positions match;
- attention is block-diagonal causal: an example never sees an earlier one.

How the block structure reaches the attention depends on the implementation
(transformers 5.23):

- ``eager`` and ``sdpa``: an explicit 4D additive mask (see
  :func:`packed_attention_mask`). transformers can also infer the blocks from
  restarting ``position_ids``, but only when no 2D mask *and* no KV cache is
  passed; a forward with the default ``use_cache=True`` creates a cache and
  silently lets examples attend to each other. The 4D mask does not depend on
  that, so qlora always passes it.
- ``flash_attention_2/3``: these cannot take a 4D mask; transformers derives
  the sequence boundaries (``cu_seqlens``) from the restarting ``position_ids``
  when the attention mask is ``None``.

Any other implementation is refused by :func:`check_packing_supported`.
The first token of every example carries no label, so the last token of one
example is never trained to predict the first of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.errors import UsageError
from qlora.train.data.tokenize import TokenizedExample

MASK_ATTENTION = ("eager", "sdpa")
POSITION_ATTENTION = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PackedRow:
    """Examples laid end to end; ``sequence_ids[t]`` says which one token t belongs to."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    sequence_ids: list[int]
    indices: tuple[int, ...]


def check_packing_supported(attn_implementation: str) -> None:
    """Refuse packing where examples could attend to each other.

    Raises:
        UsageError: the attention implementation cannot isolate packed examples.
    """
    if attn_implementation not in MASK_ATTENTION + POSITION_ATTENTION:
        raise UsageError(
            f"--packing is not supported with attention implementation {attn_implementation!r}: qlora cannot "
            "keep packed examples from attending to each other there. Use eager, sdpa or flash_attention_2/3, "
            "or train without --packing."
        )


def pack_examples(examples: list[TokenizedExample], seq_len: int) -> list[PackedRow]:
    """Pack examples in their given order (next-fit), so a shuffled order stays shuffled.

    Raises:
        UsageError: an example is longer than ``seq_len`` (truncate first).
    """
    rows: list[PackedRow] = []
    current: list[TokenizedExample] = []
    used = 0
    for example in examples:
        n = len(example.input_ids)
        if n > seq_len:
            raise UsageError(
                f"example {example.index} has {n} tokens, more than seq_len={seq_len}; truncate before packing."
            )
        if current and used + n > seq_len:
            rows.append(_row(current))
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        rows.append(_row(current))
    return rows


def packed_attention_mask(sequence_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Block-diagonal causal mask ``(batch, 1, L, L)``: 0 where attention is allowed, else the dtype's minimum.

    This additive form is what transformers' eager attention adds to its
    scores and what SDPA accepts as ``attn_mask``; it must be in the model's
    compute dtype. Every token sees at least itself, so no row is all masked.
    """
    length = sequence_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    same = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    allowed = (same & causal)[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=sequence_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def _row(examples: list[TokenizedExample]) -> PackedRow:
    ids, labels, positions, sequences = [], [], [], []
    for k, example in enumerate(examples):
        n = len(example.input_ids)
        ids += example.input_ids
        labels += example.labels
        positions += range(n)
        sequences += [k] * n
    return PackedRow(ids, labels, positions, sequences, tuple(e.index for e in examples))
