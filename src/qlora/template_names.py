"""The names ``--template`` takes, and the spellings other tools give them.

LLaMA-Factory and axolotl write ``llama3``, Unsloth ``llama-3``, axolotl
``tokenizer_default``; users type ``ChatML`` or ``llama_3``. One table maps
every spelling to qlora's name, so the command line, qlora's YAML and other
tools' config files read the same words the same way. Kept free of heavy
imports: every command's argument parser uses it.
"""

from __future__ import annotations

import difflib
from typing import Sequence

# The names of the chat formats: auto and tokenizer (the model's own), none (raw text: generate and chat
# only), and the built-in templates of qlora.train.data.templates.
TEMPLATE_NAMES = ("auto", "tokenizer", "none", "chatml", "llama-3", "alpaca")
TRAIN_TEMPLATE_NAMES = tuple(n for n in TEMPLATE_NAMES if n != "none")  # train, eval, serve: a chat format

# A spelling, lower-cased without '-', '_', '.' or spaces -> qlora's name.
_SPELLINGS = {
    "auto": "auto",
    "tokenizer": "tokenizer",
    "tokenizerdefault": "tokenizer",  # axolotl's chat_template: tokenizer_default
    "none": "none",
    "chatml": "chatml",
    "llama3": "llama-3",  # LLaMA-Factory's and axolotl's name
    "alpaca": "alpaca",
}


def _key(text: str) -> str:
    return "".join(c for c in text.lower() if c not in "-_. ")


def template_name(text: str, choices: Sequence[str] = TRAIN_TEMPLATE_NAMES) -> str:
    """qlora's name for the chat format ``text`` names (any spelling of the table), one of ``choices``.

    Raises:
        ValueError: for another name, listing ``choices`` and the closest of them.
    """
    name = _SPELLINGS.get(_key(str(text)))
    if name in choices:
        return name
    known = {key: n for key, n in _SPELLINGS.items() if n in choices}
    close = difflib.get_close_matches(_key(str(text)), list(known), n=1, cutoff=0.5)
    hint = f" (did you mean {known[close[0]]}?)" if close else ""
    if name is not None:  # none, where a chat format is needed
        hint = f" ({name}, raw text without a template, is for generate only)"
    raise ValueError(f"unknown chat template {text!r}; choose from {', '.join(choices)}{hint}")
