"""``qlora quantize``: write a bitsandbytes-format 4-bit checkpoint of a model.

The folder loads in transformers with bitsandbytes installed and in qlora
without it, and skips quantize-on-load the next time. MoE experts (3-D weights)
are written 16-bit, as transformers + bitsandbytes writes them: it quantizes
linear layers only, so 4-bit experts would load nowhere but qlora. qlora
quantizes them while loading the folder, to the codes it gives the original.
"""

from __future__ import annotations

import argparse

from ...quant import BLOCKSIZES
from ...shard_size import add_max_shard_size

NAME = "quantize"
HELP = "write a bitsandbytes-format 4-bit checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a 16/32-bit model folder or hub id")
    parser.add_argument("--output", required=True, help="folder for the 4-bit checkpoint")
    parser.add_argument("--quant", default="nf4", choices=("nf4", "fp4"), help="4-bit data type")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize the block constants to 8 bits")
    parser.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, help="weights per absmax block")
    parser.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the unquantized tensors (embeddings, norms, output head) and the "
                             "bnb_4bit_compute_dtype recorded for the 4-bit layers")
    add_max_shard_size(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace qlora's earlier results in an existing --output (only files qlora wrote)")


def run(args: argparse.Namespace) -> int:
    from ...model.chat_format import merged_format
    from ...model.image_pixels import PixelBounds
    from ...model.inference_files import carry_inference_files
    from ...model.load import bnb_4bit_config, load_model, read_model_config, resolve_model_dir
    from ...model.quantized_io import check_quantizable, dense_expert_share, save_quantized
    from ...model.trained_tokens import model_tokenization
    from ...model.turn_end_eos import add_turn_end_eos

    from ...output_folder import check_output, staged_output

    check_output(args.output, overwrite=args.overwrite, inputs={"--model": args.model})
    check_quantizable(resolve_model_dir(args.model))
    resaved = bnb_4bit_config(read_model_config(resolve_model_dir(args.model))) is not None
    # a merged fine-tune's record, else none (read before the slow load): quantizing leaves the data pipeline as it was
    tokenization = model_tokenization(args.model)
    model, tokenizer = load_model(args.model, quant=args.quant, double_quant=args.double_quant,
                                  blocksize=args.blocksize, device="cpu",
                                  compute_dtype=args.compute_dtype,  # load_model reads the name
                                  quantize_experts=False)
    _check_same_format(args, model)
    trained, bounds = merged_format(args.model), PixelBounds.load(args.model)  # a merged fine-tune's, else none
    # transformers, vLLM and TGI stop at the answer's end token of a merged fine-tune (kept, or added to a folder
    # merged before merges listed it)
    add_turn_end_eos(getattr(model, "generation_config", None), tokenizer, trained, tokenization.get("eot_tokens", ""))
    with staged_output(args.output, "quantize", replace=True) as stage:
        save_quantized(model, stage, tokenizer, max_shard_bytes=args.max_shard_size)
        carry_inference_files(resolve_model_dir(args.model), stage, trained, bounds,  # takes images still
                              tokenization)
    if resaved:  # loaded in its own format (checked above), nothing quantized a second time
        print(f"{args.model} is a bitsandbytes {args.quant} checkpoint already: re-saved as it is to {args.output}")
    else:
        print(f"wrote {args.quant} checkpoint of {args.model} to {args.output}")
    share = dense_expert_share(model)
    if share:
        print(f"its mixture-of-experts experts ({share:.0%} of the weights) are stored {args.compute_dtype}, as "
              "transformers + bitsandbytes stores them (it quantizes linear layers only); qlora quantizes them to "
              f"{args.quant} when it loads the folder, as it does the original")
    return 0


def _check_same_format(args: argparse.Namespace, model) -> None:
    """A bitsandbytes 4-bit --model loads in its own format: re-saved as it is, never re-quantized
    (that would round the 4-bit values a second time), so a different format asked is refused."""
    from ...errors import UsageError
    from ...nn import Linear4bit

    layer = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    if layer is None:
        return
    have = (layer.quant_type, layer.double_quant, layer.blocksize)
    if have == (args.quant, args.double_quant, args.blocksize):
        return

    def describe(quant: str, double_quant: bool, blocksize: int) -> str:
        return f"{quant}, {'double' if double_quant else 'no double'} quantization, block size {blocksize}"

    flags = f"--quant {have[0]} --{'' if have[1] else 'no-'}double-quant --blocksize {have[2]}"
    raise UsageError(f"{args.model} is a bitsandbytes 4-bit checkpoint (its config.json names {describe(*have)}), "
                     f"not {describe(args.quant, args.double_quant, args.blocksize)} as asked; 4-bit weights cannot "
                     "be re-quantized without rounding them a second time. Give the original 16/32-bit model to "
                     f"--model to quantize it as asked, or pass {flags} to re-save this one as it is.")
