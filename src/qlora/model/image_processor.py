"""The processor that turns a vision-language model's images into its inputs, for training on images.

qlora uses the model folder's own processor (``AutoProcessor``): it knows how many tokens each image takes
and what tensors the model's forward wants, so training sees what inference with transformers sees. Where
``AutoProcessor`` fails for want of torchvision (a video processor), the family's processor for images alone is
built instead (:mod:`qlora.model.image_only_processor`). Models whose forward needs per-batch structure beyond
image tensors and token ids are refused by type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from qlora.errors import UsageError
from qlora.model.image_pixels import PixelBounds
from qlora.model.quantize import non_text_names

# Model types whose images reach the language model other than through a vision tower feeding tokens of its sequence.
REFUSED_TYPES = {
    "mllama": "Llama 3.2 Vision attends to images through cross-attention layers, whose masks (cross_attention_mask) "
              "qlora does not build",
    "fuyu": "Fuyu embeds image patches with a linear layer of its decoder (vision_embed_tokens), from the list of "
            "patch tensors its processor returns, which qlora neither batches nor keeps out of 4 bits and LoRA",
    "chameleon": "Chameleon turns images into tokens of its vocabulary with a VQ-VAE inside the model, which qlora "
                 "does not keep out of 4 bits and LoRA",
    "emu3": "Emu3 turns images into tokens of its vocabulary with a VQ-VAE inside the model, which qlora does not "
            "keep out of 4 bits and LoRA",
}


_DISTRIBUTIONS = {"PIL": "pillow", "cv2": "opencv-python", "sklearn": "scikit-learn"}  # import name -> pip name


# The attribute that carries a run's pixel bounds with its processor, as LLaMA-Factory's patch_processor does.
_BOUNDS = "qlora_pixel_bounds"


def load_image_processor(model_dir: str | Path, model: nn.Module, tokenizer, where: str,
                         subject: str = "this row holds images", bounds: PixelBounds = PixelBounds()):
    """The model folder's processor (for images alone where ``AutoProcessor`` needs torchvision), with the run's
    ``tokenizer`` and the pixel ``bounds`` its images are scaled into first (:func:`pixel_bounds`).

    Args:
        model_dir: the model folder or hub name (``--model``).
        model: the loaded model, to check it has a vision tower.
        tokenizer: the run's tokenizer (with any tokens the run or its adapter added).
        where: the first row (or option) with images, named in errors.
        subject: what holds the images, for errors ("this row holds images").

    Raises:
        UsageError: a model without a vision tower, a refused model type, or a folder with no processor
            transformers can build (naming the package it needs).
    """
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind in REFUSED_TYPES:  # first: some of them see images without a vision tower
        raise UsageError(f"{where}: images are not supported for {kind} models: {REFUSED_TYPES[kind]}. "
                         "Use it with text only, or use a model whose images are tokens of its sequence "
                         "(Qwen2-VL, Gemma 3, LLaVA, Idefics3/SmolVLM).")
    if getattr(config, "vision_config", None) is None or not non_text_names(model):
        raise UsageError(f"{where}: {subject}, but {model_dir} ({kind}) has no vision tower, so it cannot "
                         "see them. Train a vision-language model (Qwen2-VL, Gemma 3, LLaVA, SmolVLM, ...) or "
                         "remove the images.")
    from transformers import AutoProcessor

    try:  # never transformers' question on the terminal, nor code from the folder (see shipped_code)
        processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a folder it cannot build a processor from
        processor = _without_auto_processor(model_dir, kind, tokenizer, exc, where)
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise UsageError(f"{where}: {model_dir}'s processor ({type(processor).__name__}) has no image processor "
                         "and tokenizer, so it cannot turn images into the model's inputs.")
    processor.tokenizer = tokenizer
    setattr(processor, _BOUNDS, bounds)
    return processor


def pixel_bounds(processor) -> PixelBounds:
    """The pixel bounds images are scaled into before ``processor`` sees them (none unless the run set them)."""
    return getattr(processor, _BOUNDS, None) or PixelBounds()


def _without_auto_processor(model_dir, kind: str, tokenizer, exc: Exception, where: str):
    """The processor for images alone when ``AutoProcessor`` failed with ``exc`` for want of torchvision (see
    :mod:`qlora.model.image_only_processor`), else the error naming what is missing."""
    from qlora.model.image_only_processor import NeedsTorchvision, for_want_of_torchvision, image_only_processor
    from qlora.model.shipped_code import processor_code_error

    custom = processor_code_error(model_dir, kind) if isinstance(exc, ValueError) else None
    if custom is not None:
        raise UsageError(f"{where}: {custom}") from None
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if for_want_of_torchvision(exc):
        try:
            return image_only_processor(model_dir, kind, tokenizer)
        except NeedsTorchvision as again:
            raise UsageError(f"{where}: the processor of {kind} models ({model_dir}) needs torchvision, which is not "
                             f"installed, so images cannot be turned into its inputs ({again}): pip install "
                             "torchvision, or use the model with text only.") from None
        except Exception as again:  # noqa: BLE001 - transformers raises many types building a processor
            raise UsageError(f"{where}: transformers cannot build the processor of {kind} models ({model_dir}) "
                             "without torchvision, which is not installed, and the processor for images alone "
                             f"that qlora builds then fails ({_said(again)}). Install what it "
                             "names, or torchvision, or use the model with text only.") from None
    if missing:
        package = _DISTRIBUTIONS.get(missing, missing)
        raise UsageError(f"{where}: the processor of {kind} models ({model_dir}) needs {package}, which is not "
                         f"installed, so images cannot be turned into its inputs: pip install {package}, or use "
                         "the model with text only.") from None
    raise UsageError(f"{where}: images need the model's processor, which transformers cannot build "
                     f"from {model_dir} ({_said(exc)}). The folder needs "
                     "the hub's processor files (processor_config.json / preprocessor_config.json); some "
                     "processors need torchvision installed.") from None


def image_tensors(encoded) -> dict[str, torch.Tensor]:
    """The processor output's tensors for the model besides the text's ids and mask (``pixel_values``,
    ``image_grid_thw``, ``token_type_ids``, ``image_sizes``, ...); not the ``labels`` PaliGemma's processor adds
    (qlora labels its rows itself, and a prompt's all-ignored labels would only have the forward score it)."""
    return {k: v for k, v in encoded.items()
            if k not in ("input_ids", "attention_mask", "labels") and isinstance(v, torch.Tensor)}


def image_token_id(processor) -> int | None:
    """The id the model replaces by image features (LLaVA's ``<image>``, Gemma 3's ``<image_soft_token>``), if
    the processor names it."""
    token = getattr(processor, "image_token_id", None)
    if token is None and getattr(processor, "image_token", None):
        token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return token


# Errors of the processor's call that mean a wrong call (qlora's arguments) or a processor that does not match the
# installed transformers, not input it cannot take: no other image or prompt fixes them, so they are not reported
# as the user's input but propagate as the bugs they are. Any other type is the processor refusing the input.
NOT_INPUT_ERRORS = (TypeError, AttributeError, NameError, ImportError)


def process(processor, text: str, images: list, where: str = "", names: Sequence[str] = (), **extra):
    """``processor``'s tensors (``return_tensors="pt"``) for one ``text`` with its ``images`` (PIL images, named
    ``names`` in errors) and ``extra`` arguments (PaliGemma's ``suffix``).

    Raises:
        UsageError: the processor refuses or fails on the input (more images than places for them, an image it
            cannot resize, ...), naming its error, ``where`` (a row, or nothing) and the image it fails on alone.
        TypeError, AttributeError, NameError, ImportError: from the processor's call, unchanged (see
            :data:`NOT_INPUT_ERRORS`).
    """
    try:
        return processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt", **extra)
    except NOT_INPUT_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - a processor raises many types for input it cannot take
        failing = _refused_image(processor, images)
        if failing is not None:
            index, error = failing
            name = repr(names[index]) if index < len(names) else str(index + 1)
            size = images[index].size
            hint = (" (LLaMA-Factory's Qwen2-VL plugin cuts such images to a ratio of 180 first; so do a run with "
                    "--image-resize qwen2-vl and its adapter)" if "aspect ratio" in error else "")
            raise UsageError(f"{where + ': ' if where else ''}image {name} ({size[0]}x{size[1]} pixels as given to "
                             f"the processor) cannot be taken by the model's image processor "
                             f"({type(processor.image_processor).__name__}, {error}){hint}. Crop or pad the image "
                             "to a shape the processor takes, or leave it out.") from None
        raise UsageError(f"{where + ': ' if where else ''}the model's processor ({type(processor).__name__}) cannot "
                         f"take {len(images)} image(s) with this text ({_said(exc)}). Give one image per place for it "
                         "(one <image> placeholder per image in the text, or none) and pictures it can resize (not "
                         "a few pixels wide or tall).") from None


def _refused_image(processor, images: list) -> tuple[int, str] | None:
    """The first of ``images`` that ``processor``'s image processor fails on alone, with its error."""
    for index, image in enumerate(images):
        try:
            processor.image_processor(images=[image], return_tensors="pt")
        except NOT_INPUT_ERRORS:
            return None
        except Exception as exc:  # noqa: BLE001 - as in process
            return index, _said(exc)
    return None


def _said(exc: Exception) -> str:
    said = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__
