"""``--image-max-pixels``/``--image-min-pixels`` of the commands that show a trained model images (eval,
generate, chat, serve): by default the bounds the run trained with (saved beside its adapter, or copied into a
merged folder), each option replacing its saved bound."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..option_range import NON_NEGATIVE
from .options import number


def add_pixel_arguments(parser: argparse.ArgumentParser) -> None:
    """The two options, unset by default (the run's saved bounds)."""
    for bound, verb in (("max", "down"), ("min", "up")):
        parser.add_argument(f"--image-{bound}-pixels", type=number(int, NON_NEGATIVE), default=None, metavar="N",
                            help=f"scale each image with {'more' if bound == 'max' else 'fewer'} pixels than N "
                                 f"{verb} to about N before the processor, as training did with this option (0: no "
                                 f"bound; default: the bound the adapter or merged model was trained with, none "
                                 "if it saved none)")


def pixel_bounds_for(args: argparse.Namespace, adapter: str | Path | None):
    """The :class:`~qlora.model.image_pixels.PixelBounds` for ``adapter`` (``None``: the model folder's) with
    the options given.

    Raises:
        UsageError: a saved bounds file that is not valid, or a maximum below the minimum.
    """
    from ..infer.images import pixel_bounds_of

    return pixel_bounds_of(adapter, args.model, args.image_max_pixels, args.image_min_pixels)
