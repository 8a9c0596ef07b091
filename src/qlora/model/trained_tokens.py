"""Which tokens the run that trained an adapter measured its loss on: ``--train-on`` (the tokens that count),
``--seq-len`` (where examples were cut), ``--eot-tokens`` (turn ends trained besides the tokenizer's own) and
``--group-texts``/``--group-shards`` (texts cut into pre-training blocks instead of one example each).

All change the loss of the same data, so the run records them beside its adapter, under :data:`KEY` of
``qlora_adapter.json`` (the last two only when set), and ``qlora eval --adapter`` takes them as its defaults: without
options it measures the loss the run's own eval reported. Adapters written before they were recorded, and PEFT's,
record none (or only the first two); eval then uses train's defaults for what is missing.

``qlora merge`` writes the adapter's record into the merged folder (:data:`MODEL_FILE`, under the same key), and
``qlora quantize`` of that folder keeps it (the data pipeline is the same), so ``qlora eval --model merged`` measures
what eval of base + adapter did. A merged folder carries the record of the adapter merged last: the run that trained
on a merged model recorded its own, which is what eval of merged + adapter follows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .adapter_base import read_json_object
from .chat_format import stop_token_ids

KEY = "tokenization"
INFO_FILE = "qlora_adapter.json"  # beside an adapter: qlora's fields, kept out of PEFT's adapter_config.json
MODEL_FILE = "trained_tokens.json"  # in a merged (or quantized merged) model folder, which has no qlora_adapter.json
TRAIN_ON = ("assistant", "all", "completion")
_RECORD_KEYS = ("train_on", "seq_len", "eot_tokens", "group_texts")
_GROUP_KEYS = ("texts", "shards", "template")


def tokenization_record(train_on: str, seq_len: int, eot_tokens: str = "", group_texts: int = 0,
                        group_shards: int = 1, group_template: str = "auto") -> dict[str, Any]:
    """What a run writes under :data:`KEY`: the options that are set. ``group_template``: the ``--template`` the
    blocks' EOS text was chosen by (:func:`qlora.train.data.text_blocks.end_tokens`)."""
    record: dict[str, Any] = {"train_on": train_on, "seq_len": seq_len}
    if eot_tokens.strip():
        record["eot_tokens"] = eot_tokens
    if group_texts:
        record["group_texts"] = {"texts": group_texts, "shards": group_shards, "template": group_template}
    return record


def trained_tokenization(adapter_dir: str | Path, file: str = INFO_FILE) -> dict[str, Any]:
    """``{"train_on": ..., "seq_len": ...}`` as the adapter's run recorded them, with ``eot_tokens`` and
    ``group_texts``/``group_shards``/``group_template`` where it recorded those; empty for an adapter that recorded
    none. ``file``: :data:`MODEL_FILE` for a merged model's folder.

    Raises:
        UsageError: a recorded value that is not one ``qlora train`` writes (a hand-edited file).
    """
    path = Path(adapter_dir) / file
    if not path.is_file():
        return {}
    record = read_json_object(path).get(KEY)
    if record is None:
        return {}
    record = record if isinstance(record, dict) else {}
    group = record.get("group_texts")
    unknown = [*(k for k in record if k not in _RECORD_KEYS),
               *(f"group_texts.{k}" for k in (group if isinstance(group, dict) else ()) if k not in _GROUP_KEYS)]
    if unknown:  # a misspelt key would be passed over, and eval would measure other tokens than the run did
        raise UsageError(f"{path}: {KEY} holds {', '.join(map(repr, unknown))}, which qlora train does not write "
                         f"(it writes {', '.join(_RECORD_KEYS)}; group_texts holds {', '.join(_GROUP_KEYS)}); correct "
                         f"or delete it there, or give --train-on, --seq-len, --eot-tokens and --group-texts.")
    train_on, seq_len = record.get("train_on"), record.get("seq_len")
    eot_tokens = record.get("eot_tokens", "")
    group = group if group is not None else {"texts": 0, "shards": 1, "template": "auto"}
    texts, shards, template = (group.get(k) for k in ("texts", "shards", "template")) if isinstance(group, dict) \
        else (None, None, None)
    if (train_on not in TRAIN_ON or not _whole(seq_len, 2) or not isinstance(eot_tokens, str)
            or not _whole(texts, 0) or not _whole(shards, 1) or not isinstance(template, str)):
        raise UsageError(f"{path}: {KEY} must be an object with train_on (one of {', '.join(TRAIN_ON)}) and seq_len "
                         f"(a whole number of at least 2), and optionally eot_tokens (text) and group_texts ({{texts, "
                         f"shards, template}}), as qlora train writes it, got {record!r}; correct or delete {KEY} "
                         f"there (eval then needs the run's --train-on, --seq-len, --eot-tokens and --group-texts "
                         f"given).")
    found = {"train_on": train_on, "seq_len": seq_len, "eot_tokens": eot_tokens}
    return {**found, "group_texts": texts, "group_shards": shards, "group_template": template} if texts else found


def model_tokenization(model: str | Path) -> dict[str, Any]:
    """The record a merged model's folder carries (:data:`MODEL_FILE`), as :func:`trained_tokenization` reads it;
    empty for other folders and hub ids."""
    return trained_tokenization(model, MODEL_FILE) if Path(model).is_dir() else {}


def save_model_tokenization(folder: str | Path, found: dict[str, Any]) -> None:
    """Write ``found`` (as :func:`trained_tokenization` read it) into a model folder's :data:`MODEL_FILE`, as train
    records it; nothing for an empty one (a folder without the file gets train's defaults, as its source did)."""
    if found:
        Path(folder, MODEL_FILE).write_text(json.dumps({KEY: tokenization_record(**found)}, indent=2) + "\n")


def eot_token_ids(tokenizer, eot_tokens: str, recorded_in: Path | None = None) -> set[int]:
    """The ids of ``--eot-tokens`` (comma-separated), each one token of the vocabulary, as axolotl requires of its
    eot_tokens.

    Args:
        recorded_in: the file whose :data:`KEY` gave ``eot_tokens`` (eval's default), named by the error.

    Raises:
        UsageError: a token that the vocabulary writes as several.
    """
    ids = set()
    for token in filter(None, (t.strip() for t in eot_tokens.split(","))):
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1 and recorded_in is not None:
            raise UsageError(f"{recorded_in}: {KEY}.eot_tokens lists {token!r}, which is "
                             f"{len(encoded)} tokens of the vocabulary of this model, not one: the run that recorded "
                             f"it trained with another tokenizer, or the file was edited; correct it there, or give "
                             f"--eot-tokens (\"\" for none).")
        if len(encoded) != 1:
            raise UsageError(f"--eot-tokens {token!r} is {len(encoded)} tokens of the model's vocabulary, not "
                             "one; list the token the chat template ends a turn with (see the model's "
                             "tokenizer_config.json), or add it with --add-special-tokens.")
        ids.add(encoded[0])
    return ids


def turn_end_ids(model, tokenizer, eot_tokens: str, recorded_in: Path | None = None) -> set[int]:
    """Ids that end an assistant turn in training (and so in eval): the tokenizer's end markers, the model's
    generation EOS ids and ``--eot-tokens`` (:func:`eot_token_ids`, ``recorded_in`` as there)."""
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return stop_token_ids(tokenizer, generation_eos) | eot_token_ids(tokenizer, eot_tokens, recorded_in)


def _whole(value: Any, least: int) -> bool:
    return type(value) is int and value >= least
