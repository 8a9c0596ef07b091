"""``qlora quant-error``: the quantization error of NF4, FP4 and INT4, and
their storage cost, on normal and heavy-tailed weights."""

from __future__ import annotations

import argparse

from ...quant import BLOCKSIZES
from ...option_range import Range
from ..options import non_negative_int, number

NAME = "quant-error"
HELP = "quantization error of NF4/FP4/INT4 and bits per parameter"
MAX_NUMEL = 1 << 27  # ~4 GB of round-trip tensors; the error statistics settle long before


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--numel", type=number(int, Range(2, MAX_NUMEL)), default=1 << 20,
                        help="weights drawn per distribution (the round trips hold about 30 bytes a weight)")
    parser.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="absmax block size")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed of the weights")


def run(args: argparse.Namespace) -> int:
    from ...quant.error_report import quant_error_report  # torch: not imported for --help

    rows = quant_error_report(args.numel, args.blocksize, args.seed)
    print(f"Round trip of {args.numel} weights per distribution, block size {args.blocksize}, seed {args.seed}.")
    print("Errors without double quantization, then with it (DQ); bits per parameter include the constants.\n")
    header = (f"{'weights':<14}{'code':<6}{'MSE':>11}{'max |err|':>11}{'MSE (DQ)':>11}{'max (DQ)':>11}"
              f"{'bits':>8}{'bits (DQ)':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.weights:<14}{r.quant_type:<6}{r.mse:>11.3e}{r.max_error:>11.4f}{r.mse_double_quant:>11.3e}"
              f"{r.max_error_double_quant:>11.4f}{r.bits:>8.3f}{r.bits_double_quant:>11.3f}")
    return 0
