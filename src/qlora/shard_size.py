"""``--max-shard-size``: the largest weight file a written checkpoint has, in transformers' notation.

``5GB`` is 5 * 10**9 bytes and ``5GiB`` 5 * 2**30 (as ``save_pretrained(max_shard_size=...)`` reads
them; a lowercase ``b`` after a decimal unit is bits, ``5Gb`` = 5 * 10**9 / 8), a plain integer
is bytes. A single tensor larger than the limit gets a file of its own.
"""

from __future__ import annotations

import argparse
import re

from .option_range import Range

_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_bytes(text: str) -> int:
    """``text`` (``5GB``, ``500MiB``, ``1000000``) in bytes; an ``argparse`` type, so a bad value exits 2."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", str(text), flags=re.IGNORECASE)
    size = int(match.group(1)) * _UNITS[(match.group(2) or "").upper()] if match else 0
    if match and match.group(2) and match.group(2)[-2:] in ("Kb", "Mb", "Gb", "kb", "mb", "gb"):
        size //= 8  # bits, as transformers reads "5Gb"
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give a positive whole number of bytes or "
                                         "one with a unit, such as 5GB, 500MB or 2GiB")
    return size


shard_bytes.allowed = Range(1)  # bytes: a whole positive number, checked as every numeric option's range is

DEFAULT = "5GB"  # the shard size of most checkpoints on the Hub (transformers 4's default)
DEFAULT_BYTES = shard_bytes(DEFAULT)


def add_max_shard_size(parser: argparse.ArgumentParser) -> None:
    """``--max-shard-size``, as merge and quantize take it."""
    parser.add_argument("--max-shard-size", type=shard_bytes, default=DEFAULT, metavar="SIZE",
                        help="largest weight file; a larger model is split into numbered files with an index "
                             "(5GB = 5*10^9 bytes, 2GiB = 2*2^30, or bytes)")
