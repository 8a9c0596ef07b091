"""``qlora estimate``: will this model and these options fit on my GPU?

Prints the memory table of :mod:`qlora.model.estimate` for full fine-tuning,
16-bit LoRA and QLoRA side by side, and which of them fit ``--gpu-memory``.
"""

from __future__ import annotations

import argparse

from ...errors import UsageError

NAME = "estimate"
HELP = "memory needed to fine-tune a model: full, 16-bit LoRA and QLoRA side by side"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GiB such as 24, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive size in GiB, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...model.estimate import KNOWN_SHAPES, METHODS, OPTIMIZERS, QUANT_TYPES

    parser.add_argument("--model", required=True,
                        help=f"model directory or config.json, a hub id, or a known shape: {', '.join(KNOWN_SHAPES)}")
    parser.add_argument("--quant", choices=QUANT_TYPES, default="nf4", help="4-bit data type of the base (default nf4)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize the block constants to 8 bits (default on)")
    parser.add_argument("--blocksize", type=_positive_int, default=64, help="weights per absmax block (default 64)")
    parser.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated linear names to adapt, e.g. q_proj,v_proj (default: all linear layers)")
    parser.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute each layer in the backward pass (default on)")
    parser.add_argument("--optim", choices=OPTIMIZERS, default="paged_adamw_32bit",
                        help="optimizer (default paged_adamw_32bit)")
    parser.add_argument("--method", choices=METHODS, default="sft",
                        help="training objective: dpo and orpo run each pair's chosen and rejected answers "
                             "(--batch-size pairs = twice the sequences); dpo adds its reference pass (default sft)")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="dpo: reference log-probs computed once before training (no reference model kept)")
    parser.add_argument("--gpu-memory", type=_gib, default=None, help="GPU memory in GiB to check the totals against")


def run(args: argparse.Namespace) -> int:
    from ...model.estimate import TrainingOptions, estimate, format_table, load_config

    targets = None
    if args.target_modules is not None:
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        if not targets:
            raise UsageError("--target-modules is empty; give comma-separated linear layer names such as q_proj,v_proj.")
    opts = TrainingOptions(
        quant=args.quant, double_quant=args.double_quant, blocksize=args.blocksize, rank=args.rank,
        target_modules=targets, seq_len=args.seq_len, batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, method=args.method,
        precompute_ref=args.precompute_ref,
    )
    config = load_config(args.model)
    unit = "" if opts.method == "sft" else f" pairs ({opts.method.upper()})"
    print(f"{args.model}: seq {opts.seq_len} x batch {opts.batch_size}{unit}, {opts.quant}"
          f"{' + double quant' if opts.double_quant and opts.quant != 'none' else ''}, block {opts.blocksize}, "
          f"LoRA r={opts.rank}\n")
    print(format_table(estimate(config, opts), args.gpu_memory))
    return 0
