"""Images in prompts of vision-language models: ``qlora generate --image``, ``/image`` in ``qlora chat``, image
parts sent to ``qlora serve``.

A prompt with images is rendered as training renders rows with images (every content as parts, an image part
where each image goes), then the model folder's processor expands each image placeholder into the image's
tokens and computes the image tensors (``pixel_values``, Gemma 3's ``token_type_ids``, LLaVA-NeXT's
``image_sizes``, ...). Those go into the prefill only, as transformers' ``generate`` passes them
(``prepare_inputs_for_generation`` drops them after the first forward); the steps after it run on the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from qlora.chat.images import ImageRef
from qlora.model.image_pixels import PixelBounds
from qlora.model.image_processor import image_tensors, pixel_bounds, process


def image_processor(model, tokenizer, model_dir: str | Path, where: str, subject: str = "images were given",
                    bounds: PixelBounds = PixelBounds()):
    """The processor that turns images into ``model``'s inputs (the model folder's own ``AutoProcessor``), each
    image scaled into ``bounds`` first (the run's, :func:`pixel_bounds_of`); ``where`` and ``subject`` (what holds
    the images) open its errors.

    Raises:
        UsageError: ``model`` has no vision tower (naming ``model_dir``), its type is refused, or its processor
            cannot be built (a package it needs is missing: torchvision for Llama 4, ...).
    """
    from qlora.model.image_processor import load_image_processor

    return load_image_processor(model_dir, model, tokenizer, where, subject=subject, bounds=bounds)


def pixel_bounds_of(adapter: str | Path | None, model_dir: str | Path, max_pixels: int | None = None,
                    min_pixels: int | None = None) -> PixelBounds:
    """The pixel bounds images are shown to a model with: those saved with ``adapter`` (none for an adapter saved
    without them), else, with no adapter, those ``qlora merge`` saved in the folder ``model_dir``; each bound given
    (``--image-max-pixels``/``--image-min-pixels``, 0: none) replaces the saved one."""
    saved = PixelBounds.load(adapter if adapter is not None else model_dir)  # a hub id holds no file: none
    return saved.overridden(max_pixels, min_pixels)


def encode_with_images(processor, model, prompt: str, images: Sequence[ImageRef],
                       bounds: PixelBounds | None = None) -> tuple[torch.Tensor, dict]:
    """``(ids, media)``: the ``(1, length)`` token ids of the rendered ``prompt`` with each image placeholder
    expanded, and the image tensors for the prefill, on the model's device (floating ones in its compute dtype).
    Each image is scaled into ``bounds`` first (default: the processor's, :func:`image_processor`).

    Raises:
        UsageError: an image that cannot be read, or a prompt with images the processor refuses or fails on
            (more images than places for them, an image it cannot resize, ...), naming its error.
        TypeError, AttributeError, NameError, ImportError: from the processor's call, unchanged (see
            :data:`~qlora.model.image_processor.NOT_INPUT_ERRORS`).
    """
    bounds = pixel_bounds(processor) if bounds is None else bounds
    encoded = process(processor, prompt, [ref.load(bounds) for ref in images], names=[ref.shown for ref in images])
    embeddings = model.get_input_embeddings().weight
    device, dtype = embeddings.device, embeddings.dtype
    media = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in image_tensors(encoded).items()}
    return encoded["input_ids"].to(device), media


def media_rows(media: dict, rows: int, length: int) -> dict:
    """``media`` of one prompt for ``rows`` copies of it: per-token tensors (Gemma 3's ``token_type_ids``)
    right-padded with 0 to ``length`` (tokens after the prompt are text), every tensor repeated per row."""
    from qlora.chat.image_examples import token_aligned

    out = {}
    for key, value in media.items():
        if token_aligned(key) and value.shape[-1] < length:
            value = torch.cat([value, value.new_zeros((*value.shape[:-1], length - value.shape[-1]))], -1)
        out[key] = value if rows == 1 else torch.cat([value] * rows)
    return out
