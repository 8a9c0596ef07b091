"""Bounds on an image's pixel count, applied before the processor as LLaMA-Factory applies them.

LLaMA-Factory's ``image_max_pixels``/``image_min_pixels`` scale an image over the maximum, then one under the
minimum, by ``sqrt(bound / (width x height))``, each side rounded down, with PIL's ``resize`` and its default
filter on the image as opened (nearest for palette and 1-bit images, bicubic for others); the image becomes RGB
after. The processor then resizes it by its own rules, so the bounds change what the model sees (and, for
processors whose token count follows the size, such as Qwen2-VL's, how many tokens an image takes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PixelBounds:
    """``max_pixels``/``min_pixels`` of an image (0: no bound)."""

    max_pixels: int = 0
    min_pixels: int = 0


def bounded(image, bounds: PixelBounds):
    """``image`` (a PIL image, any mode) scaled into ``bounds``; the image itself when it is within them."""
    if bounds.max_pixels and image.width * image.height > bounds.max_pixels:
        image = _scaled(image, bounds.max_pixels)
    if bounds.min_pixels and image.width * image.height < bounds.min_pixels:
        image = _scaled(image, bounds.min_pixels)
    return image


def _scaled(image, pixels: int):
    factor = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * factor), int(image.height * factor)))
