"""A saved tokenizer's ``tokenizer_config.json`` in the spelling transformers 4 reads as well as 5.

transformers 5 writes two things transformers 4 cannot read: the class name ``TokenizersBackend`` (a tokenizer
whose folder named the generic ``PreTrainedTokenizerFast``, as Llama 3's does), which 4.x does not know, and the
additional special tokens as a list under ``extra_special_tokens``, which 4.x reads as a dict of named tokens and
fails on (``'list' object has no attribute 'keys'``). A merged or quantized folder is read next by tools that still
run on transformers 4: llama.cpp's ``convert_hf_to_gguf.py`` (its requirements pin ``transformers<5``), vLLM and
TGI releases built on 4.x. Both spellings below are the 4.x ones, which transformers 5 reads as its own:
``PreTrainedTokenizerFast`` is its alias of ``TokenizersBackend``, and ``additional_special_tokens`` becomes
``extra_special_tokens`` when it loads (only where the file holds the old key alone: with both it drops the old).
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "tokenizer_config.json"
_V5_CLASS, _V4_CLASS = "TokenizersBackend", "PreTrainedTokenizerFast"


def readable_by_transformers_4(folder: str | Path) -> None:
    """Rewrite ``folder``'s :data:`FILE` (if any) in the spelling transformers 4 and 5 both read."""
    path = Path(folder, FILE)
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    if config.get("tokenizer_class") == _V5_CLASS:
        config["tokenizer_class"] = _V4_CLASS
        changed = True
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list) and "additional_special_tokens" not in config:
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
        changed = True
    if changed:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
