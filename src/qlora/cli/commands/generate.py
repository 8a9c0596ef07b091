"""``qlora generate``: stream a model's continuation of one prompt to stdout.

Also home of the model options that ``qlora chat`` shares (--model, --adapter,
--quant and the sampling options).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ...errors import UsageError

NAME = "generate"
HELP = "stream a model's continuation of a prompt, with sampling options"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --quant and the sampling options of ``SamplingOptions``."""
    from ...infer.generate import SamplingOptions

    parser.add_argument("--model", required=True, help="local model directory (transformers checkpoint)")
    parser.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to apply")
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"), default="none",
                        help="quantize the base on load (default: none)")
    for f in dataclasses.fields(SamplingOptions):
        kind = int if f.name in ("max_new_tokens", "top_k", "seed") else float
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])


def sampling_options(args: argparse.Namespace):
    """The ``SamplingOptions`` given on the command line."""
    from ...infer.generate import SamplingOptions

    return SamplingOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingOptions)})


def load_model_from_args(args: argparse.Namespace):
    """``(model, tokenizer)`` for --model; 4-bit and adapters need ``qlora.model.load`` (not yet merged)."""
    if not Path(args.model).is_dir():
        raise UsageError(f"model directory {args.model} does not exist")
    if args.quant != "none" or args.adapter:
        raise UsageError("--quant nf4/fp4 and --adapter need qlora's model loader, which this build lacks; "
                         "use --quant none without --adapter")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
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
