"""``qlora merge``: adapter + base -> a standard 16-bit transformers checkpoint.

By default the adapter is folded into the *dequantized* 4-bit base, i.e. the
exact weights it was trained against, so the merged model's outputs match the
training-time model (merging into the original 16-bit weights would not).
"""

from __future__ import annotations

import argparse

from ...shard_size import add_max_shard_size

NAME = "merge"
HELP = "fold an adapter into its base: a standard 16-bit HF checkpoint"

_DTYPES = ("bfloat16", "float16", "float32")
_SHORT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the names --compute-dtype and train use


def _dtype(name: str) -> str:
    return _SHORT.get(name, name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the base model the adapter was trained on (or the adapter folder: its "
                                          "config names the base; default: the base the --adapter folder's "
                                          "adapter_config.json names)")
    parser.add_argument("--adapter", help="PEFT-format adapter folder")
    parser.add_argument("--output", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--quant", default=None, choices=("nf4", "fp4", "none"),
                        help="the base data type used in training; none = merge into 16-bit weights (default: the "
                             "format the adapter was trained on, else nf4)")
    parser.add_argument("--dtype", default="bfloat16", type=_dtype, choices=_DTYPES,
                        help="dtype of the merged weights (bf16, fp16, fp32 also accepted)")
    add_max_shard_size(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace qlora's earlier results in an existing --output (only files qlora wrote)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ...model.adapter_io import adapter_tokenizer, load_adapter
    from ...model.load import load_model, resolve_model_dir
    from ...model.chat_format import ChatFormat
    from ...model.image_pixels import PixelBounds
    from ...model.merge import cast_merged, merge, save_merged
    from ...model.inference_files import copy_base_files
    from ...model.trained_tokens import trained_tokenization

    from ...output_folder import check_output, staged_output
    from ...errors import UsageError
    from ..base_model import load_kwargs

    if not args.adapter:
        raise UsageError("qlora merge needs --adapter DIR (or --model DIR of the adapter, whose adapter_config.json "
                         "names the base model).")
    check_output(args.output, overwrite=args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter})
    # the adapter's records, which save_merged carries, checked before the (slow) model load
    trained = ChatFormat.load(args.adapter)
    PixelBounds.load(args.adapter)
    trained_tokenization(args.adapter)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, **load_kwargs(args), compute_dtype=dtype, device="cpu")
    tokenizer = adapter_tokenizer(args.adapter, tokenizer)
    load_adapter(model, args.adapter, keep_base=False)
    merge(model, into="dequantized", dtype=dtype)
    cast_merged(model, dtype)
    with staged_output(args.output, "merge", replace=True) as stage:
        # with the adapter's run's chat format, image pixel bounds and trained tokens (a merged base's record is of
        # the run merged into it before): qlora generate/chat/eval/serve prompt the merged model and show it images
        # as the adapter's run did, and eval measures the tokens it did
        save_merged(model, stage, tokenizer, max_shard_bytes=args.max_shard_size)
        # a vision-language model takes images still; llama.cpp's converter finds a SentencePiece vocabulary
        copy_base_files(resolve_model_dir(args.model), stage, tokenizer_dir=args.adapter,
                        trained_template=trained is not None)
    print(f"merged {args.adapter} into {args.model} ({args.dtype}): {args.output}")
    return 0
