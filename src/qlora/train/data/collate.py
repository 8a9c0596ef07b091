"""Batches for the training loop: padding, packed rows, order, token counts.

The trainer's contract with this module:

- :func:`shuffled_indices` gives the order of one epoch from (seed, epoch)
  alone, so a resumed run sees the same batches as an uninterrupted one;
- :func:`pad_collate` / :func:`packed_collate` turn a list of examples or
  packed rows into the keyword arguments of a transformers causal LM forward;
- the loss must be normalized by :func:`count_trainable_tokens` summed over
  all micro-batches of one optimizer step (and all ranks), not averaged per
  micro-batch, so accumulation equals one big batch with variable lengths.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from qlora.chat.image_examples import image_batch, segment_image_batch
from qlora.chat.prefix_lm import prefix_tokens
from qlora.chat.tokenize import IGNORE_INDEX, TokenizedExample
from qlora.train.data.image_packing import ImageBlocks, image_blocks
from qlora.train.data.packing import (
    CHUNKED, MASK_ATTENTION, POSITION_ATTENTION, PackedRow, check_packing_supported, joined_rows, packed_attention_mask,
)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the pad token, else EOS.

    Padding never decides the labels (they are ``IGNORE_INDEX`` by position),
    so pad == eos is harmless and the final EOS of every example still counts.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``, ``labels`` (-100 on pads), 2D ``attention_mask``, and
    the image tensors of rows with images (:func:`~qlora.chat.image_examples.image_batch`)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(e.media for e in examples):
        batch |= image_batch(list(examples), length)
    return batch


def packed_collate(
    rows: Sequence[PackedRow], pad_id: int, attn_implementation: str, dtype: torch.dtype = torch.float32,
    windows: dict[str, int | None] | None = None,
    positions: Callable[[list[int], dict[str, Any]], torch.Tensor] | None = None, blocks: ImageBlocks | None = None,
    numbering: Callable[[torch.Tensor], torch.Tensor] | None = None, prefix_lm: bool = False,
) -> dict[str, Any]:
    """Batch packed rows: ``input_ids``, ``labels``, restarting ``position_ids`` (for flash attention, the rows end to
    end as one: :func:`~qlora.train.data.packing.joined_rows`) and, for eager/sdpa, a 4D mask
    (a mapping of layer type to mask, transformers' form, where the model mixes full and sliding layers), and the
    image tensors of the examples with images (:mod:`~qlora.train.data.image_packing`).

    Args:
        rows: from :func:`pack_examples`.
        pad_id: the id for padding shorter rows (labels there are -100).
        attn_implementation: the model's ``config._attn_implementation``.
        dtype: the model's compute dtype (the 4D mask must match it).
        windows: :func:`~qlora.train.data.packing.attention_windows` of the model (default: full attention).
        positions: :func:`~qlora.train.data.image_packing.multimodal_positions` of the model, for 3-D rotary
            positions of each example: ``position_ids`` is then ``(4, batch, length)``, the restarting text
            positions above them.
        blocks: :func:`~qlora.train.data.image_packing.image_blocks_of` the model: the per-token tensor marking
            images whose tokens see each other both ways (Gemma 3's ``token_type_ids``, Molmo2's
            ``mm_token_type_ids``) and how they group.
        numbering: :func:`~qlora.train.data.packing.example_positions` of the model: each example's positions as
            the model numbers them alone, where that is not from 0 (RoBERTa's start at ``padding_idx + 1``).
        prefix_lm: the model reads each example's prompt both ways (PaliGemma: :mod:`qlora.chat.prefix_lm`):
            the tokens before its first trained one are one block in the mask.

    Raises:
        UsageError: an attention implementation that cannot isolate examples.
    """
    check_packing_supported(attn_implementation, windows)
    if attn_implementation in POSITION_ATTENTION and len(rows) > 1:
        rows = [joined_rows(list(rows))]
    length = max(len(r.input_ids) for r in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(length).repeat(len(rows), 1)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        position_ids[i, :n] = torch.tensor(r.position_ids)
        position_ids[i, n:] = torch.arange(length - n)  # padding: one more "sequence" of its own
        sequence_ids[i, :n] = torch.tensor(r.sequence_ids)
    places = position_ids.clone()  # each token's place in its example, whatever numbering the model gives it
    for i, r in enumerate(rows):
        for start, end in r.spans if numbering is not None else ():
            position_ids[i, start:end] = numbering(input_ids[i:i + 1, start:end])[0]
    if positions is not None:
        position_ids = torch.cat([position_ids[None], _multimodal_positions(rows, position_ids, positions)])
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if any(media for r in rows for media in r.media):
        batch |= segment_image_batch([list(zip(r.media, (s for s, _ in r.spans))) for r in rows], length)
    if attn_implementation in MASK_ATTENTION:
        block_ids = (image_blocks(batch[blocks.key], sequence_ids, blocks.per_run)
                     if blocks is not None and blocks.key in batch else None)
        if prefix_lm:
            block_ids = torch.where(prefix_tokens(labels, sequence_ids) & (sequence_ids >= 0), sequence_ids, -1)
        masks = {kind: packed_attention_mask(sequence_ids, dtype, None if kind == CHUNKED else window, block_ids,
                                             window if kind == CHUNKED else None, places)
                 for kind, window in (windows or {"full_attention": None}).items()}
        batch["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
    return batch


def _multimodal_positions(rows: Sequence[PackedRow], text: torch.Tensor, positions: Callable) -> torch.Tensor:
    """``(3, batch, length)`` rotary positions: each example's own, the text positions (three times) on padding."""
    out = text[None].repeat(3, 1, 1)
    for i, r in enumerate(rows):
        for (start, end), media in zip(r.spans, r.media):
            out[:, i, start:end] = positions(r.input_ids[start:end], media)
    return out


def shuffled_indices(n: int, seed: int, epoch: int = 0) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch) on every platform."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def count_trainable_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that count in the loss: labels after the causal shift that are not -100."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
