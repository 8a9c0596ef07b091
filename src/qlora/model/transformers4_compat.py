"""A written model folder's ``config.json`` and ``tokenizer_config.json`` in the spelling transformers 4 reads too.

A merged or quantized folder is read next by tools that may still run on transformers 4: llama.cpp's
``convert_hf_to_gguf.py`` (its requirements pin ``transformers<5``), vLLM and TGI releases built on 4.x, a user's
own scripts. transformers 5 writes four things 4.x misreads:

- the rotary embedding's settings only under ``rope_parameters``, where 4.x reads ``rope_theta``, ``rope_scaling``
  and ``partial_rotary_factor`` (Gemma 3: and ``rope_local_base_freq``) at the top: it falls back to its defaults
  without a word (Qwen's base frequency 1e6 read as 1e4, Llama 3.1's ``llama3`` and Gemma 3's linear scaling
  dropped), so every output is silently off (Phi-3's longrope, Qwen2-VL's mrope and OLMo's, OLMo 2's and
  Chameleon's linear or dynamic scaling are spelt as their own 4.x files are: 4.x refused or failed on a plain copy);
- the tokenizer class ``TokenizersBackend`` (a tokenizer whose folder named the generic
  ``PreTrainedTokenizerFast``, as Llama 3's does), which 4.x does not know;
- the additional special tokens as a list under ``extra_special_tokens``, which 4.x reads as a dict of named
  tokens and fails on (``'list' object has no attribute 'keys'``);
- a model's own named special tokens (Gemma 3's ``image_token``, ``boi_token``, ``eoi_token``) at the top alone,
  where 4.x sees none of them: its Gemma 3 processor fails (``no attribute image_token_id``); they are listed in
  ``extra_special_tokens`` as a dict too, as 4.x wrote them.

The 4.x keys are added beside (rope) or instead of (tokenizer) transformers 5's, which reads them as its own:
``rope_parameters`` stays and agrees with the mirrored keys (checked: where the running transformers would read
them otherwise, as Gemma 4's and LFM3's per-layer-type parameters, which no 4.x release knows, they are left out),
``PreTrainedTokenizerFast`` is its alias of
``TokenizersBackend``, ``additional_special_tokens`` is its old name of the list, and a dict of named tokens
under ``extra_special_tokens`` is read beside that list as 5.x reads its own top-level ones.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

_V5_CLASS, _V4_CLASS = "TokenizersBackend", "PreTrainedTokenizerFast"
# the special tokens every tokenizer names; transformers 5 takes any other ``*_token`` string of the file as a
# model's own named token (Gemma 3's image_token, boi_token), 4.x only those listed in extra_special_tokens
_STANDARD = {f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")}
# model types whose transformers 4 config takes a rope_scaling of exactly two keys, ``type`` (linear or dynamic) and
# ``factor``, and refuses any other (a ``rope_type`` key, or both names): OLMo, OLMo 2 and Chameleon
_TYPE_AND_FACTOR = frozenset({"olmo", "olmo2", "chameleon"})


def readable_by_transformers_4(folder: str | Path) -> None:
    """Rewrite ``folder``'s ``config.json`` and ``tokenizer_config.json`` (those it has) as described above."""
    _rewrite(Path(folder, "config.json"), _config)
    _rewrite(Path(folder, "tokenizer_config.json"), _tokenizer_config)


def _rewrite(path: Path, change) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and change(data):
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(config: dict[str, Any]) -> bool:
    """Mirror ``rope_parameters`` into 4.x's keys, in the config and its text config (vision-language models)."""
    changed = False
    for part in (config, config.get("text_config")):
        if not isinstance(part, dict) or not isinstance(part.get("rope_parameters"), dict):
            continue
        keys = {k: v for k, v in _v4_rope(part["rope_parameters"], part.get("model_type") in _TYPE_AND_FACTOR).items()
                if part.get(k) is None}
        if keys and _read_alike(part, keys):
            part.update(keys)
            changed = True
    return changed


def _read_alike(part: dict[str, Any], keys: dict[str, Any]) -> bool:
    """Whether the running transformers reads ``part`` with the 4.x ``keys`` beside its ``rope_parameters`` as it
    reads it without them. Gemma 4's config (no 4.x release) keeps a ``rope_scaling`` it does not convert and fails
    on it (``Missing required keys ... 'proportional': {'rope_theta'}``), and a config converting by transformers'
    default lets ``rope_scaling`` replace per-layer-type parameters whole; a model type it does not know (remote
    code) cannot be checked and gets the keys."""
    from transformers import AutoConfig
    from transformers.utils import logging

    try:  # transformers' typed config fields raise this
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, without typed configs
        StrictDataclassError = TypeError
    failures = (KeyError, ValueError, TypeError, OSError, StrictDataclassError)

    def read(config: dict[str, Any]) -> Any:
        """As from a folder: the file's own spellings (``{"__float__": "Infinity"}``, Falcon-H1's time_step_limit)
        are decoded there only."""
        with tempfile.TemporaryDirectory(prefix="qlora-config-") as folder:
            Path(folder, "config.json").write_text(json.dumps(config), encoding="utf-8")
            return getattr(AutoConfig.from_pretrained(folder, trust_remote_code=False), "rope_parameters", None)

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # its notes on the spelling (rope_scaling deprecated, ...) are no news here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                alone = read(part)
            except failures:
                return True
            try:
                return read({**part, **keys}) == alone
            except failures:
                return False
    finally:
        logging.set_verbosity(level)


def _v4_rope(rope: dict[str, Any], type_and_factor: bool = False) -> dict[str, Any]:
    """4.x's keys for ``rope_parameters``: one set for all layers, or Gemma 3's per layer type (the full-attention
    layers' as the model's, the sliding ones' base frequency as ``rope_local_base_freq``); ``type_and_factor``: a
    linear or dynamic scaling as the two keys alone that the model type's 4.x config accepts."""
    full, sliding = rope.get("full_attention"), rope.get("sliding_attention")
    if isinstance(full, dict) and isinstance(sliding, dict):
        local = sliding.get("rope_theta")
        return {**_v4_rope(full, type_and_factor),
                **({"rope_local_base_freq": local} if isinstance(local, (int, float)) else {})}
    if not isinstance(rope.get("rope_theta"), (int, float)):
        return {}
    keys = {"rope_theta": rope["rope_theta"]}
    if "partial_rotary_factor" in rope:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", scaling.get("type")) == "longrope":
        # 4.x reads longrope's original context length at the top alone, and Phi-3's config accepts no
        # rope_scaling but exactly {type, short_factor, long_factor} (its own files' spelling)
        if "original_max_position_embeddings" in scaling:
            keys["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        scaling.pop("rope_type", None)
        scaling["type"] = "longrope"
    kind = scaling.get("rope_type", scaling.get("type"))
    if type_and_factor and kind in ("linear", "dynamic") and "factor" in scaling:
        scaling = {"type": kind, "factor": scaling["factor"]}
    if scaling.get("rope_type", "default") != "default" or set(scaling) - {"rope_type", "type"}:
        keys["rope_scaling"] = scaling  # a default rope with settings of its own too: Qwen2-VL's mrope_section
    return keys


def _tokenizer_config(config: dict[str, Any]) -> bool:
    changed = False
    if config.get("tokenizer_class") == _V5_CLASS:
        config["tokenizer_class"] = _V4_CLASS
        changed = True
    if isinstance(config.get("extra_special_tokens"), list) and "additional_special_tokens" not in config:
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
        changed = True
    named = {k: v for k, v in config.items() if k.endswith("_token") and k not in _STANDARD and isinstance(v, str)}
    if named and "extra_special_tokens" not in config:
        config["extra_special_tokens"] = named
        changed = True
    return changed
