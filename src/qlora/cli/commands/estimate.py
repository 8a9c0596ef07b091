"""``qlora estimate``: will this model and these options fit on my GPU?

Prints the memory table of :mod:`qlora.model.estimate` for full fine-tuning,
16-bit LoRA and QLoRA side by side, and which of them fit ``--gpu-memory``.
The options and their defaults are those of ``qlora train`` (taken from
:class:`qlora.train.config.TrainConfig`, so they cannot drift apart): what
``qlora estimate MODEL`` prints is what ``qlora train --model MODEL`` needs.
"""

from __future__ import annotations

import argparse

from ...errors import UsageError

NAME = "estimate"
HELP = "memory needed to fine-tune a model: full, 16-bit LoRA and QLoRA side by side"

# TrainConfig fields that change memory, shown with train's flag names and defaults.
_TRAIN_OPTIONS = ("quant", "double_quant", "blocksize", "rank", "target_modules", "target_parameters", "seq_len",
                  "batch_size",
                  "gradient_checkpointing", "optim", "chunked_ce", "method", "precompute_ref")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from ...model.estimate import KNOWN_SHAPES, OPTIMIZERS
    from ...option_range import POSITIVE
    from ...quant import BLOCKSIZES
    from ...train.config import TrainConfig, field_type
    from ..options import number

    where = f"model directory or config.json, a hub id, or a known shape: {', '.join(KNOWN_SHAPES)}"
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help=where)
    parser.add_argument("--model", help="the same as MODEL (as qlora train spells it)")
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name in _TRAIN_OPTIONS:
        f = by_name[name]
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata["help"]
        if field_type(f) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif name == "blocksize":
            parser.add_argument(flag, type=int, choices=BLOCKSIZES, default=f.default, help="weights per absmax block")
        elif name == "optim":
            parser.add_argument(flag, choices=OPTIMIZERS, default=f.default, help=help_text)
        elif field_type(f) is int:
            parser.add_argument(flag, type=number(int, f.metadata["range"]), default=f.default, help=help_text)
        else:
            parser.add_argument(flag, choices=f.metadata["choices"], default=f.default, help=help_text)
    parser.add_argument("--gpu-memory", type=number(float, POSITIVE), default=None,
                        help="GPU memory in GiB to check the totals against")


def run(args: argparse.Namespace) -> int:
    from ...model.estimate import TrainingOptions, estimate, format_table, load_config

    if args.model_arg and args.model and args.model_arg != args.model:
        raise UsageError(f"two models given: {args.model_arg} and --model {args.model}; give one")
    model = args.model_arg or args.model
    if not model:
        raise UsageError("give the model: qlora estimate MODEL (a folder, a config.json, a hub id or a known shape)")
    targets = None
    parameters = tuple(t.strip() for t in args.target_parameters.split(",") if t.strip())
    if args.target_modules.strip().lower() == "none" or (not args.target_modules.strip() and parameters):
        targets = ()
    elif args.target_modules.strip() != "all-linear":
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        if not targets:
            raise UsageError("--target-modules is empty; give comma-separated linear layer names such as q_proj,v_proj.")
    opts = TrainingOptions(
        quant=args.quant, double_quant=args.double_quant, blocksize=args.blocksize, rank=args.rank,
        target_modules=targets, target_parameters=parameters, seq_len=args.seq_len, batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, chunked_ce=args.chunked_ce,
        method=args.method, precompute_ref=args.precompute_ref,
    )
    config = load_config(model)
    unit = {"sft": "", "kto": " examples (KTO)"}.get(opts.method, f" pairs ({opts.method.upper()})")
    print(f"{model}: seq {opts.seq_len} x batch {opts.batch_size}{unit}, {opts.quant}"
          f"{' + double quant' if opts.double_quant and opts.quant != 'none' else ''}, block {opts.blocksize}, "
          f"LoRA r={opts.rank}, checkpointing {'on' if opts.gradient_checkpointing else 'off'}, {opts.optim}"
          f"{', chunked loss' if opts.chunked_ce else ''}\n")
    print(format_table(estimate(config, opts), args.gpu_memory))
    return 0
