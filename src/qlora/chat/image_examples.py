"""Rows with images to the processor's token ids, the same loss mask as text, and the image tensors.

A vision-language model's processor turns each image placeholder of the chat template's text (Qwen2-VL's
``<|image_pad|>``, Gemma 3's ``<start_of_image>``, LLaVA's ``<image>``) into the many tokens the image
takes, and computes the image tensors (``pixel_values``, ``image_grid_thw``, ``token_type_ids``,
``image_sizes``, ...). The loss mask comes from the text path unchanged (:func:`tokenize_example`: one
rendering, assistant turns located in it): the processor's ids are the text path's ids with the placeholders
expanded, so aligning the two sequences carries every label over; tokens the processor inserts are image
tokens and are never trained. A placeholder inside a trained turn, or ids that do not align, are refused.

Truncation never cuts an image: a row whose image tokens do not all fit ``--seq-len`` is skipped and counted;
one whose images fit is cut after them like any text.
"""

from __future__ import annotations

from dataclasses import replace
from difflib import SequenceMatcher
from typing import Any, Iterable, Sequence

import torch

from qlora.chat.example import Example, render_kwargs
from qlora.chat.images import as_parts
from qlora.chat.tokenize import (IGNORE_INDEX, IMAGES_TOO_LONG, TokenizedExample, for_template, rendered_text,
                                 tokenize_example)
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.model.image_processor import image_tensors, image_token_id, pixel_bounds, process


def token_aligned(key: str) -> bool:
    """Whether the processor's tensor ``key`` has one entry per token (Gemma 3's ``token_type_ids``, Qwen's
    ``mm_token_type_ids``): it is truncated and padded with the ids; other tensors are per image."""
    return key.endswith("token_type_ids")


def tokenize_image_example(
    example: Example,
    processor,
    chat_template: ChatFormat,
    train_on: str = "assistant",
    seq_len: int | None = None,
    index: int = 0,
    stop_ids: Iterable[int] | None = None,
) -> TokenizedExample | str:
    """The ids, labels and image tensors of a conversation with images, or :data:`IMAGES_TOO_LONG` when its
    image tokens do not fit ``seq_len``. A conversation without images (beside rows with images) is the text
    path's, its contents given as parts as TRL's vision collator gives every row: vision-language templates
    (LLaVA's) render only content parts, so a string content would vanish.

    Args:
        example: a normalized conversation with ``images``.
        processor: the model's ``AutoProcessor`` (its ``tokenizer`` the run's tokenizer).
        chat_template, train_on, stop_ids: as for :func:`~qlora.chat.tokenize.tokenize_example`.
        seq_len: keep at most this many tokens, never cutting an image.
        index: the example's position in the dataset.

    Raises:
        UsageError: an image placeholder inside a trained turn, or a processor whose ids are not the chat
            template's with the placeholders expanded.
    """
    tokenizer = processor.tokenizer
    text_example = replace(example, messages=tuple(as_parts(example.messages)), images=())
    if not example.images:  # a text-only row among rows with images (LLaVA's mix, ScienceQA's rows without one)
        return tokenize_example(text_example, tokenizer, chat_template, train_on, seq_len, index, stop_ids)
    text = tokenize_example(text_example, tokenizer, chat_template, train_on, None, index, stop_ids)
    rendered = rendered_text(text_example, tokenizer, chat_template)
    eos = len(text.input_ids) - len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if eos > 0:  # the text path appended an EOS the rendering lacks: the processor gets it too
        rendered += tokenizer.eos_token
    encoded = process(processor, rendered, [ref.load(pixel_bounds(processor)) for ref in example.images], example.where,
                      [ref.shown for ref in example.images])
    ids = encoded["input_ids"][0].tolist()
    labels, image_end = _aligned_labels(text.input_ids, text.labels, ids, example.where)
    media = image_tensors(encoded)
    truncated = seq_len is not None and len(ids) > seq_len
    if truncated:
        if image_end > seq_len:
            return IMAGES_TOO_LONG
        ids, labels = ids[:seq_len], labels[:seq_len]
        media = {k: v[:, :seq_len] if token_aligned(k) else v for k, v in media.items()}
    return TokenizedExample(ids, labels, index, truncated, text.reasoning_hidden, media)


def _aligned_labels(text_ids: list[int], text_labels: list[int], ids: list[int],
                    where: str) -> tuple[list[int], int]:
    """Labels for the processor's ``ids`` from the text path's, and where the last image's tokens end. A row the
    text path trains whole (train_on all, or completion for a conversation) trains its image tokens too, as TRL's
    vision collator labels every token but padding."""
    labels = [IGNORE_INDEX] * len(ids)
    image_end = 0
    whole = all(label != IGNORE_INDEX for label in text_labels[1:])
    matcher = SequenceMatcher(None, text_ids, ids, autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            labels[b0:b1] = text_labels[a0:a1]
            continue
        if whole:
            labels[b0:b1] = ids[b0:b1]  # an image's tokens, inside a row trained whole
        elif any(label != IGNORE_INDEX for label in text_labels[a0:a1]) or (
                op == "insert" and 0 < a0 < len(text_labels) and text_labels[a0 - 1] != IGNORE_INDEX
                and text_labels[a0] != IGNORE_INDEX):
            raise UsageError(f"{where}: the processor's tokens differ from the chat template's inside a trained "
                             "turn (an image placeholder written in an assistant answer?), so the answer's tokens "
                             "cannot be located. Remove image markers (such as <image>) from the answers.")
        image_end = max(image_end, b1)
    labels[0] = IGNORE_INDEX
    return labels, image_end


def expanded_prompt(prompt: Example, keep: int, processor, chat_template: ChatFormat,
                    seq_len: int | None = None) -> tuple[list[int], dict[str, Any], tuple[tuple[int, int], ...]] | str:
    """A preference prompt with images through the processor, once for both answers: the ids of its first
    ``keep`` text-path tokens (where the answers start) with the placeholders expanded, its image tensors, and
    the spans of those ids that stand for the images (those the processor put in, and the model's image token
    wherever it is); or :data:`IMAGES_TOO_LONG` when the image tokens do not fit ``seq_len``.

    Args:
        prompt: the prompt's messages (image parts as ``{"type": "image"}``) with ``images``.
        keep: how many of the text path's prompt ids (its generation-prompt rendering) the pair keeps.
        processor, chat_template: as for :func:`tokenize_image_example`.

    Raises:
        UsageError: a processor whose ids are not the chat template's with the placeholders expanded.
    """
    tokenizer = processor.tokenizer
    messages = for_template(as_parts(prompt.messages), chat_template.template, tokenizer, prompt.where,
                            chat_template.origin)
    rendered = chat_template.render(tokenizer, messages, prompt.where, add_generation_prompt=True,
                                    **render_kwargs(prompt))
    text_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    encoded = process(processor, rendered, [ref.load(pixel_bounds(processor)) for ref in prompt.images], prompt.where,
                      [ref.shown for ref in prompt.images])
    ids = encoded["input_ids"][0].tolist()
    cut, spans = None, []
    for op, a0, a1, b0, b1 in SequenceMatcher(None, text_ids, ids, autojunk=False).get_opcodes():
        if op == "equal":
            if cut is None and a0 <= keep <= a1:
                cut = b0 + keep - a0
        else:
            spans.append((b0, b1))
    if cut is None and keep == len(text_ids):
        cut = len(ids)
    if cut is None or any(b1 > cut for _, b1 in spans):
        raise UsageError(f"{prompt.where}: the processor's tokens of the prompt are not the chat template's with the "
                         "image placeholders expanded, so where the answers start cannot be located. Check that the "
                         "model folder's processor and chat template belong together.")
    token = image_token_id(processor)
    spans += [(i, i + 1) for i, t in enumerate(ids[:cut]) if t == token]
    media = image_tensors(encoded)
    end = max((b1 for _, b1 in spans), default=0)
    if seq_len is not None and end > seq_len:
        return IMAGES_TOO_LONG
    media = {k: v[:, :cut] if token_aligned(k) else v for k, v in media.items()}
    return ids[:cut], media, tuple(spans)


def image_batch(examples: Sequence[Any], length: int) -> dict[str, torch.Tensor]:
    """The micro-batch's image tensors (``examples``: rows with ``media``, :class:`TokenizedExample` or a
    preference pair's row): per-token ones right-padded with 0 to ``length`` and stacked (zeros for
    a row without images), per-image ones concatenated in row order (Qwen2-VL's patches and grids, LLaVA's and
    Gemma 3's images), zero-padded where a dimension differs (LLaVA-NeXT's crops, Idefics3's images a row, whose
    models skip all-zero padding)."""
    return segment_image_batch([[(e.media, 0)] for e in examples], length)


# Per-image tensors holding indices into the flattened patches of the processor's call (Molmo2's pooling of patches
# into image tokens, -1 where none), and the patches they index. Each example was processed alone, its indices
# from 0, so in a batch they move past the patches of the examples before it, as the processor's own batch does.
PATCH_INDICES = {"image_token_pooling": "pixel_values", "video_token_pooling": "pixel_values_videos"}


def segment_image_batch(rows: Sequence[Sequence[tuple[dict[str, Any], int]]], length: int) -> dict[str, torch.Tensor]:
    """:func:`image_batch` of rows that each hold segments ``(media, start)``: a packed row's examples, each one's
    per-token tensors placed from its ``start`` token, the per-image tensors of all segments concatenated in
    row, then segment order (the order of their image tokens, in which the model places image features), indices
    into the patches (:data:`PATCH_INDICES`) moved to their place in the batch."""
    keys = list(dict.fromkeys(k for row in rows for media, _ in row for k in media))
    batch: dict[str, Any] = {}
    for key in keys:
        if token_aligned(key):
            found = [media[key] for row in rows for media, _ in row if key in media]
            out = torch.zeros((len(rows), length), dtype=found[0].dtype)
            for r, row in enumerate(rows):
                for media, start in row:
                    if key in media:
                        out[r, start:start + media[key].shape[-1]] = media[key][0]
            batch[key] = out
            continue
        tensors = [media[key] for row in rows for media, _ in row if key in media]
        shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) != shape[1:]:
                full = t.new_zeros([t.shape[0], *shape[1:]])
                full[tuple(slice(0, n) for n in t.shape)] = t
                t = full
            padded.append(t)
        batch[key] = torch.cat(padded)
    for key, patches in PATCH_INDICES.items():
        if key in batch:
            segments = [media for row in rows for media, _ in row if key in media]
            per_patch = batch[patches].shape[1:-1].numel()  # the flattened patches of one of its (padded) crops
            offsets = torch.tensor([0] + [m[patches].shape[0] * per_patch for m in segments[:-1]]).cumsum(0)
            batch[key] = torch.cat([torch.where(m[key] >= 0, m[key] + int(o), m[key])
                                    for m, o in zip(segments, offsets)])
    return batch
