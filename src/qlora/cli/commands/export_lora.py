"""``qlora export --format gguf-lora``: the adapter alone as a GGUF LoRA adapter, with an Ollama Modelfile.

The base model is not loaded: its config names the tensors, the adapter's files give the matrices. The
Modelfile's ``FROM`` is the base model's GGUF (``--base-gguf``, checked to hold every tensor the adapter
adapts, with the same shapes), or a placeholder the user replaces; Ollama applies an adapter only to the
model it was trained on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...errors import UsageError

PLACEHOLDER = "BASE-MODEL.gguf"


def run_lora(args: argparse.Namespace) -> int:
    from ...model.adapter_io import adapter_tokenizer
    from ...model.chat_format import ChatFormat
    from ...model.gguf_export import require_gguf
    from ...model.gguf_lora import TYPES, export_gguf_lora
    from ...model.gguf_vocab import gguf_vocab
    from ...model.load import load_tokenizer, read_model_config, resolve_model_dir
    from ...model.modelfile import write_modelfile
    from ...output_folder import check_output, staged_output

    require_gguf()
    if not args.adapter:
        raise UsageError("--format gguf-lora writes an adapter: give it with --adapter (the base is --model).")
    if args.compute_dtype is not None:  # (--quant is not read either: the adapter's matrices are the same on any base)
        raise UsageError("--compute-dtype applies to the merged export (--format gguf); a GGUF LoRA adapter holds "
                         "the adapter's own matrices, in --type.")
    if args.type not in TYPES:
        raise UsageError(f"--type {args.type} is not a GGUF adapter type; llama.cpp's adapters are "
                         f"{', '.join(TYPES)} (k-quants are for whole models).")
    out = Path(args.output)
    if out.suffix == ".gguf":
        raise UsageError(f"--output is a folder (it receives the .gguf adapter and a Modelfile), not {out.name}")
    base_gguf = Path(args.base_gguf).resolve() if args.base_gguf else None
    if base_gguf is not None and not base_gguf.is_file():
        raise UsageError(f"--base-gguf {args.base_gguf} is not a file; give the base model's GGUF "
                         f"(qlora export --format gguf --model BASE, without --adapter).")
    check_output(out, overwrite=args.overwrite, inputs={"--model": args.model, "--adapter": args.adapter})
    model_dir = resolve_model_dir(args.model)
    config = read_model_config(model_dir)
    tokenizer = adapter_tokenizer(args.adapter, load_tokenizer(model_dir))
    trained = ChatFormat.load(args.adapter)
    if trained is not None:
        tokenizer.chat_template = trained.template
    gguf_name = f"adapter-{args.type}.gguf"
    with staged_output(out, "export", replace=True) as tmp:
        tmp.mkdir(parents=True)
        path = export_gguf_lora(config, args.adapter, tmp / gguf_name, args.type, name=args.name or out.resolve().name)
        if base_gguf is not None:
            check_base_gguf(path, base_gguf)
        add_bos = gguf_vocab(tokenizer, config.get_text_config().vocab_size).add_bos
        notes = write_modelfile(tmp, str(base_gguf or PLACEHOLDER), tokenizer, add_bos, adapter=gguf_name)
        if base_gguf is None:
            modelfile = tmp / "Modelfile"
            modelfile.write_text(f"# replace {PLACEHOLDER} with the GGUF of the base this adapter was trained on "
                                 f"(qlora export --format gguf --model BASE, without --adapter)\n"
                                 + modelfile.read_text(encoding="utf-8"), encoding="utf-8")
        size = path.stat().st_size
    for note in notes:
        print(f"qlora export: note: Modelfile: {note}", file=sys.stderr)
    print(f"exported {args.adapter} as a GGUF LoRA adapter {args.type} ({size / 2**20:.1f} MiB): {out / gguf_name}")
    if base_gguf is None:
        print(f"  the Modelfile's FROM is a placeholder: replace {PLACEHOLDER} with the GGUF of {args.model} "
              f"(qlora export --format gguf --model {args.model} --output DIR), the base this adapter was trained on")
    print(f"  llama.cpp: llama-cli -m {base_gguf or PLACEHOLDER} --lora {out / gguf_name}    "
          f"Ollama: ollama create NAME -f {out / 'Modelfile'}")
    return 0


def check_base_gguf(adapter: Path, base: Path) -> None:
    """What llama.cpp checks when it applies the adapter, checked now: the same architecture, and each adapted
    tensor present in the base with the shape ``lora_b @ lora_a`` has."""
    import gguf

    try:
        base_reader, lora_reader = gguf.GGUFReader(base), gguf.GGUFReader(adapter)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--base-gguf {base} is not a readable GGUF file ({exc}).") from None

    def arch(reader) -> str:
        field = reader.get_field("general.architecture")
        return field.contents() if field is not None else "?"

    if arch(base_reader) != arch(lora_reader):
        raise UsageError(f"--base-gguf {base} is a {arch(base_reader)} model, but the adapter is for "
                         f"{arch(lora_reader)}; give the GGUF of the model the adapter was trained on.")
    shapes = {t.name: [int(n) for n in t.shape] for t in base_reader.tensors}
    lora = {t.name: [int(n) for n in t.shape] for t in lora_reader.tensors}
    for name, a_shape in lora.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        b_shape = lora[target + ".lora_b"]
        if shapes.get(target) != [a_shape[0], b_shape[1]]:  # ggml order: [in, out]
            raise UsageError(f"--base-gguf {base} is not the base this adapter was made for: it has "
                             f"{target} {shapes.get(target, 'missing')}, the adapter needs "
                             f"{[a_shape[0], b_shape[1]]}. Give the GGUF of --model.")
