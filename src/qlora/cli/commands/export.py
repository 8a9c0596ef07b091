"""``qlora export --format gguf``: a fine-tune as one file for llama.cpp and Ollama.

The adapter is folded into the dequantized 4-bit base exactly as ``qlora merge``
does (the weights it was trained against), streamed into a GGUF file with the
tokenizer and chat template embedded, and an Ollama ``Modelfile`` is written
next to it. ``--format gguf-lora`` writes the adapter alone instead (:mod:`.export_lora`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import UsageError
from ...model.gguf_quantize import LLAMA_CPP_TYPES

NAME = "export"
HELP = "write a model (+ adapter, merged) as GGUF for llama.cpp / Ollama, with a Modelfile"

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the base model folder (the one the adapter was trained on; default: the base "
                                          "the --adapter folder's adapter_config.json names)")
    parser.add_argument("--adapter", help="PEFT-format adapter folder to fold in (omit to export the model as is)")
    parser.add_argument("--output", required=True,
                        help="folder to write: model-<type>.gguf (gguf-lora: adapter-<type>.gguf) and Modelfile")
    parser.add_argument("--format", default="gguf", choices=("gguf", "gguf-lora"),
                        help="gguf: the model with the adapter folded in; gguf-lora: the adapter alone as a GGUF "
                             "LoRA adapter (llama.cpp --lora, Ollama ADAPTER) for a base GGUF of --model; "
                             "types f16, bf16, q8_0, f32")
    parser.add_argument("--base-gguf", help="gguf-lora: the GGUF of --model, written as the Modelfile's FROM "
                                            "and checked to fit the adapter (default: a placeholder to edit)")
    parser.add_argument("--type", default="f16", choices=("f16", "bf16", "q8_0", "f32", *LLAMA_CPP_TYPES),
                        help="tensor type of the weight matrices (norms stay f32). k-quants (q4_k_m, q5_k_m, "
                             "q6_k, ...) and q4_0/q5_0 are made by llama.cpp's own quantizer from an f16 file "
                             "and need llama-cpp-python")
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"),
                        help="the base data type used in training: the adapter is folded into this dequantized "
                             "base, as qlora merge does (default: the format the adapter was trained on, else nf4; "
                             "none without --adapter)")
    parser.add_argument("--compute-dtype", choices=tuple(_DTYPES), default=None,
                        help="dtype the unquantized tensors are loaded in (default: fp32 for a 4-bit base, "
                             "the checkpoint's own dtype otherwise)")
    parser.add_argument("--name", help="model name stored in the file (default: the output folder's name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace qlora's earlier results in an existing --output (only files qlora wrote)")


def run(args: argparse.Namespace) -> int:
    from ...model.gguf_quantize import quantize_gguf, require_llama_cpp

    if args.format == "gguf-lora":
        from .export_lora import run_lora
        return run_lora(args)
    if args.base_gguf:
        raise UsageError("--base-gguf applies to --format gguf-lora (an adapter for a base GGUF).")

    if args.type in LLAMA_CPP_TYPES:
        require_llama_cpp()  # before seconds of imports and minutes of loading and merging, not after

    from ...model.adapter_io import adapter_tokenizer, load_adapter
    from ...model.chat_format import ChatFormat
    from ...model.gguf_export import export_gguf, require_gguf
    from ...model.gguf_mmproj import is_vision_language, mmproj_refusal, mmproj_type, plan_mmproj, write_mmproj
    from ...model.gguf_vocab import gguf_vocab
    from ...model.inference_files import processor_chat_template
    from ...model.load import load_model, resolve_model_dir
    from ...model.modelfile import write_modelfile
    from ...output_folder import check_output, staged_output
    from ..base_model import load_kwargs

    require_gguf()
    out = Path(args.output)
    if out.suffix == ".gguf":
        raise UsageError(f"--output is a folder (it receives the .gguf file and a Modelfile), not {out.name}")
    check_output(out, overwrite=args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter})
    dtype = _load_dtype(args.compute_dtype, args.quant, resolve_model_dir(args.model))
    model, tokenizer = load_model(args.model, **load_kwargs(args), compute_dtype=dtype, device="cpu")
    if args.adapter:
        tokenizer = adapter_tokenizer(args.adapter, tokenizer)
        load_adapter(model, args.adapter, keep_base=False)
        trained = ChatFormat.load(args.adapter)  # the format the adapter was trained in is the one to embed
        if trained is not None:
            tokenizer.chat_template = trained.template
    if tokenizer.chat_template is None:  # a vision-language model's template may be its processor's alone
        tokenizer.chat_template = processor_chat_template(resolve_model_dir(args.model))
    gguf_name = f"model-{args.type}.gguf"
    refusal = mmproj_refusal(model)  # a vision-language model gets its image projector file beside, or a note why not
    kind = mmproj_type(args.type)
    # the projector's checks run before the language model's minutes of writing, not after
    plan = plan_mmproj(model, resolve_model_dir(args.model), kind) if is_vision_language(model) and refusal is None \
        else None
    with staged_output(out, "export", replace=True) as tmp:
        tmp.mkdir(parents=True)
        name = args.name or out.resolve().name
        if args.type in LLAMA_CPP_TYPES:
            f16 = export_gguf(model, tokenizer, tmp / "model-f16.gguf", "f16", name=name)
            path = quantize_gguf(f16, tmp / gguf_name, args.type)
            f16.unlink()  # the staging folder holds only what the output keeps
        else:
            path = export_gguf(model, tokenizer, tmp / gguf_name, args.type, name=name)
        projector = write_mmproj(plan, tmp / f"mmproj-{kind}.gguf", name).name if plan is not None else None
        add_bos = gguf_vocab(tokenizer, model.get_input_embeddings().weight.shape[0]).add_bos
        notes = write_modelfile(tmp, gguf_name, tokenizer, add_bos, projector=projector)
        size = path.stat().st_size
    for note in notes:
        print(f"qlora export: note: Modelfile: {note}", file=sys.stderr)
    if refusal is not None:
        print(f"qlora export: note: the language model only, no image projector (mmproj): {refusal}", file=sys.stderr)
    what = (f"{args.model} + {args.adapter} (folded into the dequantized {args.quant} base)" if args.adapter
            else args.model)
    print(f"exported {what} as GGUF {args.type} ({size / 2**20:.1f} MiB): {out / gguf_name}")
    mmproj = f" --mmproj {out / projector}" if projector else ""
    cli = "llama-mtmd-cli" if projector else "llama-cli"
    print(f"  llama.cpp: {cli} -m {out / gguf_name}{mmproj}    Ollama: ollama create NAME -f {out / 'Modelfile'}")
    return 0


def _load_dtype(choice: str | None, quant: str, model_dir: Path):
    import torch

    if choice is not None:
        return getattr(torch, _DTYPES[choice])
    if quant != "none":
        return torch.float32  # only embeddings and norms stay dense: keep them exact
    from ...model.load import read_model_config

    dtype = getattr(read_model_config(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
