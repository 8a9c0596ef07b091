"""transformers' "Writing model shards" bar, shown only where loading shows one (checkpoints over 1 GB): for a
small model it is a line of noise (and carriage returns) in every log and in ``qlora demo``'s output."""

from __future__ import annotations

import contextlib
from typing import Iterator

SHOWN_FROM_BYTES = 1 << 30


@contextlib.contextmanager
def shard_bar(nbytes: int) -> Iterator[None]:
    """Within the block, ``save_pretrained`` of a model of ``nbytes`` draws its bar only from 1 GB; the bar's
    setting is given back after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if nbytes < SHOWN_FROM_BYTES:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
