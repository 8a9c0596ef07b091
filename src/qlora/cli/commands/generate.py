"""``qlora generate``: stream a model's continuation of one prompt to stdout.

Also home of the model options that ``qlora chat`` shares (--model, --adapter,
--quant and the sampling options).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

NAME = "generate"
HELP = "stream a model's continuation of a prompt, with sampling options"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --quant and the sampling options of ``SamplingOptions``."""
    from ...infer.generate import SamplingOptions

    parser.add_argument("--model", required=True, help="model folder (transformers checkpoint) or hub id")
    parser.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to apply")
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4",
                        help="4-bit format of the base weights on load, or none for 16/32-bit")
    parser.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the matmuls and unquantized weights")
    for f in dataclasses.fields(SamplingOptions):
        kind = int if f.name in ("max_new_tokens", "top_k", "seed") else float
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])


def sampling_options(args: argparse.Namespace):
    """The ``SamplingOptions`` given on the command line."""
    from ...infer.generate import SamplingOptions

    return SamplingOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingOptions)})


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` for --model/--quant/--compute-dtype, with --adapter applied."""
    import torch

    from ...model.adapter_io import load_adapter
    from ...model.load import load_model

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.compute_dtype]
    quant = None if args.quant == "none" else args.quant
    model, tokenizer = load_model(args.model, quant=quant, compute_dtype=dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.eval(), tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text to continue (used as is, no chat template)")


def run(args: argparse.Namespace) -> int:
    from ...infer.generate import stream_text

    model, tokenizer = load_model_from_args(args)
    for piece in stream_text(model, tokenizer, args.prompt, sampling_options(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
