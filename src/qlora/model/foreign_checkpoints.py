"""Checkpoints users download in a layout transformers does not read, named with the way to one it reads.

A model's weights come in other shapes than a transformers folder: llama.cpp's GGUF files, Meta's original
release (``params.json`` and ``consolidated.00.pth``, the ``original/`` folder of the Llama repositories),
Mistral's own (``params.json`` and ``consolidated.safetensors``), or weights saved under another file name
(``model.pt``). qlora reads what ``from_pretrained`` reads (see :mod:`qlora.model.weight_files`); for the
others a refusal says what the files are and how to get a transformers folder from them.

Imports nothing heavy: the CLI checks ``--model`` with it before torch is imported.
"""

from __future__ import annotations

from pathlib import Path

_GGUF_MAGIC = b"GGUF"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# what else a Trainer or PEFT writes beside a model: not weights of the model
_NOT_MODEL = ("training_args", "optimizer", "scheduler", "rng_state", "scaler", "adapter_model")


def is_gguf(path: Path) -> bool:
    """A GGUF file: named so, or starting with GGUF's magic bytes."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def _gguf_advice(name: str) -> str:
    return (f"GGUF is llama.cpp's format, which qlora does not read: give the transformers model it was made from "
            "(its hub id or folder), or dequantize it once with transformers 4.x, which reads the architectures and "
            "quant types its GGUF support lists and, unlike transformers 5, saves the result: "
            f"AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file={name!r}).save_pretrained(OUT), and "
            "AutoTokenizer alike; then give OUT.")


def gguf_file_error(path: Path) -> str:
    """The refusal of a GGUF file given as the model."""
    return f"{path} is a GGUF file. " + _gguf_advice(path.name)


def foreign_checkpoint(folder: Path) -> str:
    """What ``folder`` holds instead of transformers' weight files and how to get those, as a sentence or two
    (a leading space included); "" when it holds nothing recognisable."""
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return ""
    names = [p.name for p in files]
    original = [n for n in names if n.startswith("consolidated") and n.endswith((".pth", ".pt"))]
    if original:
        return (f" It holds Meta's original checkpoint layout ({original[0]}), which transformers "
                "does not read: use the transformers files of the same hub repository (config.json and "
                "model*.safetensors, beside its original/ folder), or convert these with transformers' "
                "convert_llama_weights_to_hf.py (in transformers' source repository, src/transformers/models/llama).")
    mistral = [n for n in names if n.startswith("consolidated") and n.endswith(".safetensors")]
    if mistral:
        return (f" It holds Mistral's own checkpoint layout ({mistral[0]}), which transformers "
                "does not read: use the transformers files of the same hub repository (config.json and "
                "model*.safetensors) where it has them, or convert these with transformers' "
                "convert_mistral_weights_to_hf.py (in transformers' source repository, "
                "src/transformers/models/mistral).")
    gguf = [p.name for p in files if is_gguf(p)]
    if gguf:
        return f" It holds {_listed(gguf)}: " + _gguf_advice(gguf[0])
    other = [n for n in names if n.lower().endswith(_WEIGHT_SUFFIXES) and not n.startswith(_NOT_MODEL)]
    if other:
        return (f" It holds {_listed(other)}, weights under a file name transformers does not read: load them with "
                "the code that wrote them and save the model with save_pretrained, which writes model.safetensors.")
    return ""


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
