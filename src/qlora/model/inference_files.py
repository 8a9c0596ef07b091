"""What a folder qlora writes from a fine-tune (a merged or a quantized model) carries beside its weights, so that
inference shows it its prompts and images as the run did.

``save_pretrained`` of the model and its tokenizer leaves out the processor's own files (the image processor's
settings, the processor's class and arguments), without which ``AutoProcessor`` cannot load the written folder:
a merged or quantized vision-language model could no longer take images. transformers 5 also writes a tokenizer as
``tokenizer.json`` alone, leaving out the SentencePiece model (``tokenizer.model``) that llama.cpp's converter reads
Gemma's vocabulary from (it stops without it), as Ollama's import and slow tokenizers do. Both are copied as the base
holds them. So is a processor's ``chat_template.json`` (hub vision-language models saved before transformers wrote
``chat_template.jinja`` keep their template there alone), unless the folder holds the run's trained chat format or
the template of an adapter's own saved tokenizer, which it would override: transformers' processors read that file
before ``chat_template.jinja``. An adapter folder's own copies of these files win over the base's.
The chat format the run trained with (``chat_format.json``) and its image pixel bounds (``image_pixels.json``) go
in too: qlora's generate, chat, eval and serve read them from a model folder as from an adapter; so does the tokens
its loss was measured on (``trained_tokens.json``), which qlora eval follows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .adapter_base import read_json_object
from .chat_format import ChatFormat
from .image_pixels import PixelBounds
from .trained_tokens import save_model_tokenization

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
TOKENIZER_MODEL_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model")  # SentencePiece's, by family
PROCESSOR_TEMPLATE = "chat_template.json"


def carry_inference_files(model_dir: str | Path, out: str | Path, chat_format: ChatFormat | None,
                          bounds: PixelBounds, tokenization: dict[str, Any]) -> None:
    """Copy the base folder ``model_dir``'s files that ``save_pretrained`` leaves out (:func:`copy_base_files`),
    and save ``chat_format`` (unless None), ``bounds`` and ``tokenization`` (unless empty; as
    :func:`~qlora.model.trained_tokens.trained_tokenization` reads it) into ``out``."""
    copy_base_files(model_dir, out, trained_template=chat_format is not None)
    save_records(out, chat_format, bounds, tokenization)


def copy_base_files(model_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None,
                    trained_template: bool = False) -> None:
    """Copy :data:`PROCESSOR_FILES`, :data:`TOKENIZER_MODEL_FILES` and (unless ``trained_template``: ``out``'s
    template is the run's chat format) :data:`PROCESSOR_TEMPLATE` that ``out`` lacks: from ``tokenizer_dir``
    (an adapter folder the tokenizer was saved in, with its added tokens and template) where it has them, else
    from the base folder ``model_dir``. The base's :data:`PROCESSOR_TEMPLATE` is left out where ``out``'s
    tokenizer (the adapter's) has a template of its own: processors read that file first, so the base's would
    replace the template the adapter was trained with."""
    template = () if trained_template else (PROCESSOR_TEMPLATE,)
    own_template = tokenizer_dir is not None and _saved_tokenizer(tokenizer_dir) and _tokenizer_template(out)
    for name in PROCESSOR_FILES + template + TOKENIZER_MODEL_FILES:
        target = Path(out, name)
        folders = [tokenizer_dir] if tokenizer_dir is not None else []
        if not (name == PROCESSOR_TEMPLATE and own_template):
            folders.append(model_dir)
        source = next((Path(d, name) for d in folders if Path(d, name).is_file()), None)
        if source is not None and not target.exists():
            shutil.copyfile(source, target)


def _saved_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` (an adapter's) holds a tokenizer, which merging it writes instead of the base's."""
    return any(Path(folder, name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _tokenizer_template(folder: str | Path) -> bool:
    """Whether the tokenizer saved in ``folder`` has a chat template (``chat_template.jinja``, or in
    ``tokenizer_config.json`` as transformers 4 wrote it)."""
    if Path(folder, "chat_template.jinja").is_file():
        return True
    config = Path(folder, "tokenizer_config.json")
    return config.is_file() and bool(read_json_object(config).get("chat_template"))


def processor_chat_template(model_dir: str | Path) -> str | None:
    """The chat template of ``model_dir``'s :data:`PROCESSOR_TEMPLATE`, or None: a vision-language model's
    template where its tokenizer has none, which llama.cpp's converter embeds in a GGUF from that file too."""
    path = Path(model_dir, PROCESSOR_TEMPLATE)
    if not path.is_file():
        return None
    template = read_json_object(path).get("chat_template")
    return template if isinstance(template, str) else None


def save_records(out: str | Path, chat_format: ChatFormat | None, bounds: PixelBounds,
                 tokenization: dict[str, Any]) -> None:
    """Save what the run recorded: ``chat_format`` (unless None), ``bounds`` and ``tokenization`` (unless empty;
    as :func:`~qlora.model.trained_tokens.trained_tokenization` reads it) into ``out``."""
    if chat_format is not None:
        chat_format.save(out)
    bounds.save(out)
    save_model_tokenization(out, tokenization)
