"""LLaMA-Factory's dataset registry: ``--data alpaca_en_demo,identity`` read from ``dataset_info.json``.

LLaMA-Factory users name their datasets in ``<dataset_dir>/dataset_info.json``: each
entry says where the rows are (``file_name`` under the folder, or ``hf_hub_url``), their
``formatting`` (``alpaca``, ``sharegpt`` or ``openai``), whether they are preference pairs
(``ranking``) or KTO rows (a ``kto_tag`` column), and the names of their ``columns``
and, for sharegpt, of their speaker ``tags``. A name that is not a path and is
registered there is read here, and each row is rebuilt in the shape
:mod:`qlora.train.data.formats` and :mod:`qlora.train.data.preference` read, as
LLaMA-Factory's converters build it:

- alpaca: the ``history`` pairs, then one user turn of ``prompt`` and ``query`` joined
  by a newline (empty ones left out), then the ``response``; ``system`` and ``tools``
  columns kept; an entry without a response column (c4_demo's ``columns: {prompt: text}``)
  holds pre-training texts: each row is its first prompt turn, as stage pt reads it (a ``.txt``
  file's rows are its lines, blank ones left out);
- sharegpt: speakers mapped by the tags (user, assistant, observation = a tool result,
  function = a tool call), user/observation and assistant/function turns alternating,
  a leading system turn or the ``system`` column as the system message;
- openai: as sharegpt (the same default column and tags), except that an assistant message's
  ``tool_calls`` are a function turn, consecutive tool results one observation turn, and the system
  prompt carries LLaMA-Factory's "detailed thinking off" convention (:func:`_openai`);
- ranking: the prompt turns, with ``chosen`` and ``rejected`` as the two answers;
- KTO: the prompt turns, the last turn as the completion and the tag as its ``label``.

Entries' defaults are LLaMA-Factory's: without ``columns`` the alpaca columns are
``instruction``/``input``/``output`` and the sharegpt (and openai) one ``conversations``; a ``columns``
mapping names every column used. Rows it would skip as malformed are errors here,
naming the row. ``num_samples`` draws the rows as LLaMA-Factory does, from a generator seeded with the
run's seed (:func:`qlora.train.data.declared.sample_indices`): every row once before any repeat.
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.chat.images import IMAGES_COLUMN, MEDIA_COLUMNS
from qlora.errors import UsageError
from qlora.train.data.declared import DeclaredDataset

INFO_FILE = "dataset_info.json"
DEFAULT_DIR = "data"  # LLaMA-Factory's default dataset_dir (and --dataset-dir's): a registry there is optional
_ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None}
_COMMON_COLUMNS = ("system", "tools", "chosen", "rejected", "kto_tag")
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# Our ShareGPT speakers for LLaMA-Factory's roles (what formats.py reads as user, assistant, tool result, tool call).
_SPEAKERS = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
             "function_tag": "function_call"}


@dataclass(frozen=True)
class RegisteredDataset(DeclaredDataset):
    """One ``dataset_info.json`` entry, with LLaMA-Factory's defaults filled in."""

    formatting: str
    ranking: bool
    columns: dict[str, str | None]
    tags: dict[str, str | None]
    named: tuple[str, ...] = ()  # the column names its ``columns`` mapping gives (each must exist in the data)

    def required_columns(self) -> tuple[str, ...]:
        return self.named

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """The row as LLaMA-Factory's converter builds it (see the module docstring)."""
        row = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}[self.formatting](fields, self, where)
        images = _column(fields, self, "images")
        if images is not None and "text" not in row:  # read where the row's <image> placeholders are
            row[IMAGES_COLUMN] = images
        return row


def registered_dataset(name: str, dataset_dir: str | Path) -> RegisteredDataset | None:
    """The entry ``name`` of ``<dataset_dir>/dataset_info.json``, or None when ``name`` is a path, or there
    is no such file, or (for a hub-style ``org/name``) the file does not register it.

    Raises:
        UsageError: a malformed file or entry, or a plain name the file does not register.
    """
    if str(dataset_dir).startswith("REMOTE:"):
        raise UsageError(f"--dataset-dir {dataset_dir}: LLaMA-Factory's registry on the Hugging Face hub; qlora reads "
                         f"a local one: download that dataset repository (its {INFO_FILE} and data files) and give "
                         "its folder.")
    info_path = Path(dataset_dir).expanduser() / INFO_FILE
    is_path = Path(name).expanduser().exists()
    if is_path and Path(name).expanduser().is_dir():
        _refuse_registry_folder(name)
    if not info_path.is_file():
        if not is_path and "/" not in name and str(dataset_dir) not in (DEFAULT_DIR, "ONLINE"):
            why = "none in it" if Path(dataset_dir).expanduser().is_dir() else "it is not a folder"
            raise UsageError(f"--data {name!r} is not a file, and --dataset-dir {dataset_dir} holds no {INFO_FILE} "
                             f"({why}); give the folder of LLaMA-Factory's dataset_info.json, or a data file.")
        return None  # also LLaMA-Factory's dataset_dir ONLINE: every name is a hub dataset
    info = _read_info(info_path)
    if is_path:
        if name in info:
            print(f"qlora: --data {name} is a file and also a name registered in {info_path}; reading the file "
                  "(give another path to the file, e.g. ./NAME, or rename the entry, to silence this).",
                  file=sys.stderr)
        return None
    if name not in info:
        if "/" in name:
            return None  # a hub dataset id
        close = difflib.get_close_matches(name, list(info), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"it registers {', '.join(sorted(info)) or 'nothing'}."
        raise UsageError(f"--data {name!r} is neither a file nor a dataset registered in {info_path}; {hint}")
    return _entry(name, info[name], info_path)


# Where a LLaMA-Factory entry says its rows are; ``datasets``' own dataset_info.json (save_to_disk's, a hub
# export's) describes one dataset with other keys
_SOURCE_KEYS = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def _refuse_registry_folder(folder: str) -> None:
    """Refuse a folder given as --data that is LLaMA-Factory's data folder (its dataset_info.json registers
    datasets): read as a folder of data files it would mix every dataset in it, and the registry itself."""
    path = Path(folder).expanduser()
    info_path = path / INFO_FILE
    if not info_path.is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError):
        return
    if not (isinstance(info, dict) and info and all(isinstance(e, dict) and any(k in e for k in _SOURCE_KEYS)
                                                    for e in info.values())):
        return
    names = sorted(info)
    listed = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    raise UsageError(f"--data {folder}: this folder is a LLaMA-Factory dataset folder ({info_path} registers the "
                     f"datasets {listed}), not one dataset: read as a folder of data files it would mix all of "
                     f"them. Give the folder as --dataset-dir and the datasets to train on by name, e.g. "
                     f"--dataset-dir {folder} --data {names[0]} (several: --data {','.join(names[:2])}).")


def _read_info(info_path: Path) -> dict[str, Any]:
    try:
        info = json.loads(info_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{info_path}: not a readable JSON file ({exc}); fix it or give --data a file path.") from None
    if not isinstance(info, dict):
        raise UsageError(f"{info_path}: expected an object of dataset names, got {type(info).__name__}.")
    return info


def _entry(name: str, entry: Any, info_path: Path) -> RegisteredDataset:
    where = f"{info_path}, dataset {name!r}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected an object with file_name or hf_hub_url, got {type(entry).__name__}.")
    for key in ("file_name", "hf_hub_url", "split", "subset", "formatting"):
        if key in entry and not (isinstance(entry[key], str) and entry[key].strip()):
            raise UsageError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}.")
    for key in ("ranking",):
        if key in entry and not isinstance(entry[key], bool):
            raise UsageError(f"{where}: {key} must be true or false, got {entry[key]!r}.")
    if "tags" in entry and not (isinstance(entry["tags"], dict)
                                and all(isinstance(v, (str, type(None))) for v in entry["tags"].values())):
        raise UsageError(f"{where}: tags must map tag names (role_tag, content_tag, user_tag, ...) to strings.")
    if "file_name" in entry:
        source = str(info_path.parent / entry["file_name"])
    elif "hf_hub_url" in entry:
        source = entry["hf_hub_url"]
        if entry.get("folder"):
            raise UsageError(f"{where}: folder {entry['folder']!r}: qlora reads a hub dataset's whole split, not one "
                             "folder of its repository; download that folder and register it with file_name.")
    else:
        other = next((k for k in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry), None)
        raise UsageError(f"{where}: " + (f"{other} is a source qlora does not read (ModelScope, Modelers, loading "
                                         "scripts, cloud files); download the data and register it with file_name."
                                         if other else "it names no file_name or hf_hub_url."))
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise UsageError(f"{where}: formatting {formatting!r}; LLaMA-Factory's formats are alpaca, sharegpt and "
                         "openai.")
    given = entry.get("columns")
    if given is not None and not (isinstance(given, dict) and all(isinstance(v, (str, type(None)))
                                                                 for v in given.values())):
        raise UsageError(f"{where}: columns must map names to column names.")
    media = [c for c in MEDIA_COLUMNS if (given or {}).get(c)]
    if media:
        raise UsageError(f"{where}: {', '.join(media)} columns: qlora trains on text and images, not video or "
                         "audio; give a dataset without them.")
    names = (dict(_ALPACA_COLUMNS) if formatting == "alpaca" else {"messages": "conversations"})
    names |= dict.fromkeys(_COMMON_COLUMNS) | {IMAGES_COLUMN: None}
    if given is not None:  # LLaMA-Factory: with a columns mapping, every column used is named in it
        names = {key: given.get(key) for key in names}
    tags = dict(_TAGS)
    if formatting != "alpaca" and isinstance(entry.get("tags"), dict):
        tags = {key: entry["tags"].get(key) for key in _TAGS}
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise UsageError(f"{where}: num_samples must be a positive integer, got {num_samples!r}.")
    named = tuple(v for v in (given or {}).values() if v)
    return RegisteredDataset(name, source, entry.get("split", "train"), entry.get("subset"), num_samples,
                             formatting, entry.get("ranking", False), names, tags, named)


def _column(fields: dict[str, Any], dataset: RegisteredDataset, key: str) -> Any:
    name = dataset.columns.get(key)
    return fields.get(name) if name else None


def _alpaca(fields: dict[str, Any], dataset: RegisteredDataset, where: str) -> dict[str, Any]:
    turns: list[dict[str, Any]] = []
    history = _column(fields, dataset, "history")
    for k, pair in enumerate(history if isinstance(history, list) else []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise UsageError(f"{where}: history item {k} must be a pair [instruction, response].")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [v for v in (_column(fields, dataset, "prompt"), _column(fields, dataset, "query")) if v]
    turns.append({"role": "user", "content": "\n".join(str(v) for v in query)})
    if _column(fields, dataset, "kto_tag") is not None:
        return _kto(turns, {"role": "assistant", "content": _column(fields, dataset, "response")}, fields, dataset,
                    where)
    if dataset.ranking:
        return _pair(turns, _column(fields, dataset, "chosen"), _column(fields, dataset, "rejected"), fields, dataset)
    if dataset.columns.get("response") is None:  # LLaMA-Factory's unsupervised rows: stage pt trains on the
        return {"text": turns[0]["content"]}      # first prompt turn (its first history turn, if any)
    response = _column(fields, dataset, "response")
    if not isinstance(response, str):
        raise UsageError(f"{where}: the response column {dataset.columns.get('response')!r} must be a string "
                         "(LLaMA-Factory would skip this row).")
    return _with_common({"messages": turns + [{"role": "assistant", "content": response}]}, fields, dataset)


def _sharegpt(fields: dict[str, Any], dataset: RegisteredDataset, where: str) -> dict[str, Any]:
    tags = dataset.tags
    system, raw = _system_and_messages(fields, dataset, where)
    turns = [(message.get(tags["role_tag"]), message.get(tags["content_tag"])) for message in raw]
    return _conversation(_alternating(turns, tags, where), system, fields, dataset, where)


def _openai(fields: dict[str, Any], dataset: RegisteredDataset, where: str) -> dict[str, Any]:
    """LLaMA-Factory's ``OpenAIDatasetConverter``: sharegpt's reading, except that an assistant message's
    ``tool_calls`` become a function turn (the JSON list of their ``function`` objects), consecutive tool results
    one observation turn (joined by ``\\n</tool_response>\\n<tool_response>\\n``; results after the last other
    message are left out, as there), tool definitions given as JSON become their text, and the system prompt
    gets its "detailed thinking off" convention (see :func:`_openai_system`)."""
    tags = dataset.tags
    system, raw = _system_and_messages(fields, dataset, where)
    turns, results = [], []
    for k, message in enumerate(raw):
        role, content = message.get(tags["role_tag"]), message.get(tags["content_tag"])
        if role in (tags["assistant_tag"], tags["function_tag"]) and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not (isinstance(calls, list) and all(isinstance(c, dict) and "function" in c for c in calls)):
                raise UsageError(f"{where}, message {k}: tool_calls must be a list of objects with a \"function\" "
                                 "(OpenAI's {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}).")
            role, content = tags["function_tag"], json.dumps([c["function"] for c in calls], ensure_ascii=False)
        if role == tags["observation_tag"]:
            results.append(content)
            continue
        if results:
            turns.append((tags["observation_tag"], "\n</tool_response>\n<tool_response>\n".join(map(str, results))))
            results = []
        turns.append((role, content))
    tools = _column(fields, dataset, "tools") or ""
    if isinstance(tools, (dict, list)):
        tools = json.dumps(tools, ensure_ascii=False)
    return _conversation(_alternating(turns, tags, where), _openai_system(system, tools), fields, dataset, where)


def _openai_system(system: Any, tools: str) -> str:
    """The system prompt LLaMA-Factory's openai converter trains with: "detailed thinking off" (Nemotron's switch)
    when there is none and no tools, appended on a new line to one that names neither setting when there are no
    tools, and a newline after it when there are tools."""
    off = "detailed thinking off"
    if not system:
        return "" if tools else off
    if tools:
        return f"{system}\n"
    return system if "detailed thinking on" in system or off in system else f"{system}\n{off}"


def _system_and_messages(fields: dict[str, Any], dataset: RegisteredDataset,
                         where: str) -> tuple[Any, list[dict[str, Any]]]:
    """A sharegpt or openai row's system prompt (a leading system message, else the system column) and its other
    messages."""
    tags = dataset.tags
    raw = _column(fields, dataset, "messages")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise UsageError(f"{where}: the messages column {dataset.columns.get('messages')!r} must be a list of "
                         "objects.")
    if tags["system_tag"] and raw and raw[0].get(tags["role_tag"]) == tags["system_tag"]:
        return raw[0].get(tags["content_tag"]), raw[1:]
    return _column(fields, dataset, "system"), raw


def _alternating(turns: list[tuple[Any, Any]], tags: dict[str, str | None], where: str) -> list[dict[str, Any]]:
    """``(speaker tag, content)`` turns as our ShareGPT turns, user/observation and assistant/function
    alternating as LLaMA-Factory requires."""
    accepted = (("user_tag", "observation_tag"), ("assistant_tag", "function_tag"))
    out = []
    for k, (speaker, content) in enumerate(turns):
        tag = next((t for t in accepted[k % 2] if tags[t] is not None and speaker == tags[t]), None)
        if tag is None:
            expected = " or ".join(repr(tags[t]) for t in accepted[k % 2] if tags[t] is not None)
            raise UsageError(f"{where}, message {k}: speaker {speaker!r} where {expected} must come (turns "
                             "alternate; LLaMA-Factory would skip this row).")
        out.append({"from": _SPEAKERS[tag], "value": content})
    return out


def _conversation(turns: list[dict[str, Any]], system: Any, fields: dict[str, Any], dataset: RegisteredDataset,
                  where: str) -> dict[str, Any]:
    """A sharegpt or openai row's turns as an SFT conversation, a preference pair or a KTO row."""
    tags = dataset.tags
    if len(turns) % 2 != (1 if dataset.ranking else 0):
        raise UsageError(f"{where}: {len(turns)} turns; " + ("a preference row's prompt ends with a user turn."
                                                             if dataset.ranking else "a conversation ends with "
                                                             "the assistant (LLaMA-Factory would skip this row)."))
    if _column(fields, dataset, "kto_tag") is not None:
        return _kto(_messages(turns[:-1], system), _messages(turns[-1:], None)[0], fields, dataset, where)
    if dataset.ranking:
        answers = [_column(fields, dataset, key) for key in ("chosen", "rejected")]
        if not all(isinstance(a, dict) and a.get(tags["role_tag"]) in (tags["assistant_tag"], tags["function_tag"])
                   for a in answers):
            raise UsageError(f"{where}: chosen and rejected must be assistant messages "
                             f"({tags['role_tag']!r}: {tags['assistant_tag']!r}).")
        return _pair(_messages(turns, system), *(a.get(tags["content_tag"]) for a in answers), fields, dataset,
                     with_system=False)
    return _with_common({"conversations": turns, "system": system}, fields, dataset)


def _messages(turns: list[dict[str, Any]], system: Any) -> list[dict[str, Any]]:
    """Our ShareGPT turns as role/content messages (a tool call's value stays its JSON text)."""
    roles = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}
    out = [{"role": "system", "content": system}] if system else []
    return out + [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


def _tools(fields: dict[str, Any], dataset: RegisteredDataset) -> dict[str, Any]:
    """The row's tool definitions under ``tools``, which preference and KTO rows give their template too."""
    tools = _column(fields, dataset, "tools")
    return {"tools": tools} if tools else {}


def _pair(prompt: list[dict[str, Any]], chosen: Any, rejected: Any, fields: dict[str, Any],
          dataset: RegisteredDataset, with_system: bool = True) -> dict[str, Any]:
    system = _column(fields, dataset, "system") if with_system else None
    head = [{"role": "system", "content": system}] if system else []
    return {"prompt": head + prompt, "chosen": chosen, "rejected": rejected, **_tools(fields, dataset)}


def _kto(prompt: list[dict[str, Any]], completion: dict[str, Any], fields: dict[str, Any],
         dataset: RegisteredDataset, where: str) -> dict[str, Any]:
    """TRL's unpaired preference row: ``prompt``, ``completion`` and a boolean ``label``."""
    label = _column(fields, dataset, "kto_tag")
    if not isinstance(label, bool):
        raise UsageError(f"{where}: the kto_tag column {dataset.columns['kto_tag']!r} holds {label!r}; "
                         "LLaMA-Factory reads only true or false there (a row with another value is not a KTO "
                         "example). Write true or false.")
    system = _column(fields, dataset, "system") if dataset.formatting == "alpaca" else None
    head = [{"role": "system", "content": system}] if system else []
    return {"prompt": head + prompt, "completion": [completion], "label": label, **_tools(fields, dataset)}


def _with_common(row: dict[str, Any], fields: dict[str, Any], dataset: RegisteredDataset) -> dict[str, Any]:
    for key in ("system", "tools"):
        value = _column(fields, dataset, key)
        if value and not row.get(key):
            row[key] = value
    return row
