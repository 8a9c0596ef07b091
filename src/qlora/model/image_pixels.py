"""Bounds on an image's pixel count, applied before the processor as LLaMA-Factory applies them, and saved with
the adapter so that inference shows the model its images as training did.

LLaMA-Factory's ``image_max_pixels``/``image_min_pixels`` scale an image over the maximum, then one under the
minimum, by ``sqrt(bound / (width x height))``, each side rounded down, with PIL's ``resize`` and its default
filter on the image as opened (nearest for palette and 1-bit images, bicubic for others); the image becomes RGB
after. The processor then resizes it by its own rules, so the bounds change what the model sees (and, for
processors whose token count follows the size, such as Qwen2-VL's, how many tokens an image takes).

LLaMA-Factory's Qwen2-VL plugin (its templates for Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, Qwen-Omni and kin)
resizes further after the bounds, so that transformers' processor, which refuses aspect ratios over 200, takes
every image: a side under 28 pixels is raised to 28 (the other kept, unless under 28 too), then a width over 200
times the height is cut to 180 times it (likewise a height). qlora applies these rules where a run asks for them
(``image_resize: qwen2-vl``, which LLaMA-Factory files with such a template set).

A run's bounds go beside its adapter in :data:`FILE` (a file PEFT does not read), which ``qlora merge`` copies
into the merged folder; a folder without it (a run without bounds, an older adapter) means none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from qlora.errors import UsageError

FILE = "image_pixels.json"
RESIZE_RULES = ("none", "qwen2-vl")
_QWEN2_VL_SIDE, _QWEN2_VL_RATIO, _QWEN2_VL_SQUASHED = 28, 200, 180


@dataclass(frozen=True)
class PixelBounds:
    """``max_pixels``/``min_pixels`` of an image (0: no bound), and the resize rules applied after them."""

    max_pixels: int = 0
    min_pixels: int = 0
    resize: str = "none"

    def save(self, folder: str | Path) -> None:
        """Write :data:`FILE` into ``folder`` (beside an adapter, or a merged model), unless there is nothing to
        apply."""
        if self != PixelBounds():
            data = {"image_max_pixels": self.max_pixels, "image_min_pixels": self.min_pixels,
                    "image_resize": self.resize}
            Path(folder, FILE).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path | None) -> "PixelBounds":
        """The bounds saved in ``folder``: none for a folder without :data:`FILE`, a hub id, or ``None``.

        Raises:
            UsageError: the file is not one qlora wrote (naming it and what to do).
        """
        path = Path(folder, FILE) if folder is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            bounds = cls(data.get("image_max_pixels", 0), data.get("image_min_pixels", 0),
                         data.get("image_resize", "none"))
            for value in (bounds.max_pixels, bounds.min_pixels):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ValueError(f"a pixel bound must be a whole number, 0 or more, got {value!r}")
            if bounds.resize not in RESIZE_RULES:
                raise ValueError(f"image_resize must be one of {', '.join(RESIZE_RULES)}, got {bounds.resize!r}")
            return bounds
        except (ValueError, AttributeError) as exc:
            raise UsageError(f"{path}: not a valid image pixel bounds file ({exc}); correct it (image_max_pixels, "
                             "image_min_pixels: whole numbers, 0 for none), or delete it to show the model its "
                             "images as stored.") from None

    def overridden(self, max_pixels: int | None, min_pixels: int | None) -> "PixelBounds":
        """A copy with the bounds given (``None``: kept, 0: none), checked to be in order."""
        bounds = replace(self, max_pixels=self.max_pixels if max_pixels is None else max_pixels,
                         min_pixels=self.min_pixels if min_pixels is None else min_pixels)
        if bounds.max_pixels and bounds.max_pixels < bounds.min_pixels:
            raise UsageError(f"--image-max-pixels ({bounds.max_pixels}) is below --image-min-pixels "
                             f"({bounds.min_pixels}, {'given' if min_pixels is not None else 'saved with the run'}); "
                             "give a maximum at least the minimum, or 0 for none.")
        return bounds


def bounded(image, bounds: PixelBounds):
    """``image`` (a PIL image, any mode) scaled into ``bounds`` and resized by its rules; the image itself when
    none of them changes it."""
    if bounds.max_pixels and image.width * image.height > bounds.max_pixels:
        image = _scaled(image, bounds.max_pixels)
    if bounds.min_pixels and image.width * image.height < bounds.min_pixels:
        image = _scaled(image, bounds.min_pixels)
    if bounds.resize == "qwen2-vl":
        image = _qwen2_vl_sized(image)
    return image


def _scaled(image, pixels: int):
    factor = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * factor), int(image.height * factor)))


def _qwen2_vl_sized(image):
    if min(image.width, image.height) < _QWEN2_VL_SIDE:
        image = image.resize((max(image.width, _QWEN2_VL_SIDE), max(image.height, _QWEN2_VL_SIDE)))
    if image.width / image.height > _QWEN2_VL_RATIO:
        image = image.resize((image.height * _QWEN2_VL_SQUASHED, image.height))
    if image.height / image.width > _QWEN2_VL_RATIO:
        image = image.resize((image.width, image.width * _QWEN2_VL_SQUASHED))
    return image
