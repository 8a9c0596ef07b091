"""axolotl's ``datasets:`` entries: each a source with its own row type and field names.

An axolotl config lists its datasets as mappings: ``path`` (a hub id, a local file or folder;
``data_files`` with ``ds_type`` for local files under it; ``ds_type: text`` reads any file as plain text, a
row a non-blank line in the column ``text``, as ``datasets``' text loader does), ``split``, ``name`` (the
subset) and the ``type`` of its rows. Each row is rebuilt in the shape of one of qlora's own formats, as
axolotl's prompt strategy reads it:

- ``alpaca`` (and its prompt styles ``alpaca:chat``, ``alpaca:chatml``, ``alpaca:phi``): axolotl's alpaca
  prompt (its preamble, ``### Instruction:``, ``### Input:``, ``### Response:``) filled from the
  ``instruction`` and ``input`` columns, and the ``output`` as the completion; a mapping (a custom type:
  ``field_instruction``, ``field_input``, ``field_output``, ``field_system``, ``system_prompt``,
  ``system_format``, ``format``, ``no_input_format``) fills its own prompt strings the same way. Both
  are our prompt-completion rows: only the output (and the EOS after it) is trained, as axolotl does
  unless ``train_on_inputs``;
- ``chat_template``: the ``field_messages`` column (default ``messages``) of messages whose keys
  ``message_property_mappings`` names (default ``role``/``content``; older configs:
  ``message_field_role``/``message_field_content``), their roles mapped by ``roles`` (default:
  user = human/user, assistant = gpt/assistant, system, tool; other roles are kept as they are),
  other message keys (``tool_calls``, ``reasoning_content``) as they are, and the ``field_tools``
  column (default ``tools``); ``drop_system_message: true`` leaves out a conversation's first message when
  it is a system one, as axolotl does before rendering (the template may then write its own default system
  prompt); ``sharegpt`` (deprecated in axolotl) is the same over ``conversations`` with ``from``/``value``;
- ``completion``: the ``field`` column (default ``text``) trained whole (our text format).

Under ``rl:`` (a preference method) the types are axolotl's DPO, ORPO and KTO prompt strategies instead
(:mod:`qlora.train.data.axolotl_preference`). Without ``type`` the file is read as it is, its format detected
as for ``--data``. Options whose effect qlora does not have (other ``roles_to_train``, ``train_on_eos`` or
``train_on_eot`` other than ``turn``, per-message training flags) are refused by name; an entry's own chat template
is read with the config's (:func:`qlora.train.foreign_keys.dataset_template_keys`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.axolotl_preference import (PreferenceStrategy, is_preference_type, message_mapping,
                                                 preference_strategy)
from qlora.train.data.declared import DeclaredDataset
from qlora.train.data.formats import ROLES

_DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"],
                  "tool": ["tool"]}
_CUSTOM_FIELDS = {"instruction": "field_instruction", "input": "field_input", "output": "field_output",
                  "system": "field_system"}
# axolotl's prompt strings: a custom type's defaults, and its alpaca prompter's by prompt style (the preamble
# with an input, then without one).
_CUSTOM_DEFAULTS = {"format": "{instruction} {input} ", "no_input_format": "{instruction} ", "system_format": "{system}",
                    "system_prompt": ""}
_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
             "Write a response that appropriately completes the request.",
             "Below is an instruction that describes a task. Write a response that appropriately completes the request.")
_ALPACA_STYLES = {
    "instruct": ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n", "{system}\n\n"),
    "chat": ("USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:", "SYSTEM: {system}\n"),
    "chatml": ("<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>system\n{system}<|im_end|>\n"),
    "phi": ("<|user|>\n{instruction}<|end|>{input}<|assistant|>", "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
            "<|system|>\n{system}<|end|>\n"),
}
_ENTRY_KEYS = {"path", "type", "split", "name", "data_files", "ds_type", "field_messages", "message_property_mappings",
               "message_field_role", "message_field_content", "roles", "roles_to_train", "train_on_eos", "field",
               "field_tools", "trust_remote_code", "field_chosen", "field_rejected", "train_on_eot",
               "drop_system_message"}
_DS_TYPES = ("json", "csv", "parquet", "arrow", "text")  # text: a row a line (column text), as datasets reads it
TYPES = ("alpaca", "alpaca:chat", "alpaca:chatml", "alpaca:phi", "chat_template", "sharegpt", "completion")


@dataclass(frozen=True)
class AxolotlDataset(DeclaredDataset):
    """One ``datasets:`` entry of an axolotl config, with axolotl's defaults filled in."""

    kind: str  # prompt (alpaca and custom types), chat, text, preference, or "" (read as it is)
    columns: dict[str, str] = field(default_factory=dict)  # our field -> their column
    message_keys: dict[str, str] = field(default_factory=dict)  # our message key -> theirs
    roles: dict[str, str] = field(default_factory=dict)  # their role -> ours
    # format, no_input_format, system_format, and the system prompt with and without an input
    prompt_format: dict[str, str] = field(default_factory=dict)
    strategy: PreferenceStrategy | None = None  # kind preference: axolotl's DPO/ORPO/KTO strategy
    ds_type: str = ""  # the files' format when given (text: a row a line, whatever the suffix)
    drop_system: bool = False  # kind chat: a conversation's first message is left out when it is a system one

    def plain_text(self) -> bool:
        return self.ds_type == "text"

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        if self.kind == "prompt":
            return self._prompt_completion(fields, where)
        if self.kind == "chat":
            row = {"messages": self._messages(fields, where)}
            tools = fields.get(self.columns["tools"])
            return row | {"tools": tools} if tools else row
        if self.kind == "text":
            return {"text": fields.get(self.columns["text"])}
        if self.kind == "preference":
            return self.strategy.row(fields, where)
        return fields

    def _prompt_completion(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """axolotl's prompt string filled from the row, and its output as the completion."""
        values = {ours: fields.get(theirs) for ours, theirs in self.columns.items()}
        for key in ("instruction", "output"):
            if not isinstance(values.get(key), str):
                raise UsageError(f"{where}: column {self.columns[key]!r} must be a string (axolotl's {key}).")
        strings = self.prompt_format
        text_input = values.get("input") or ""
        system = values.get("system") or strings["system" if text_input else "system_no_input"]
        head = strings["system_format"].format(system=system) if system else ""
        turn = strings["format"] if text_input else strings["no_input_format"]
        return {"prompt": head + turn.format(instruction=values["instruction"], input=text_input),
                "completion": values["output"]}

    def _messages(self, fields: dict[str, Any], where: str) -> list[dict[str, Any]]:
        raw = fields.get(self.columns["messages"])
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise UsageError(f"{where}: column {self.columns['messages']!r} must be a list of messages (objects).")
        mapped = set(self.message_keys.values())
        out = []
        for k, message in enumerate(raw):
            row = {key: v for key, v in message.items() if key not in mapped}
            row |= {ours: message[theirs] for ours, theirs in self.message_keys.items() if theirs in message}
            role = self.roles.get(row.get("role"), row.get("role"))  # axolotl keeps unmapped roles as they are
            if role not in ROLES:
                raise UsageError(f"{where}, message {k}: role {row.get('role')!r} is not mapped by the dataset's "
                                 f"roles ({', '.join(map(repr, self.roles))}); map it to one of {', '.join(ROLES)} "
                                 "under roles: in the config.")
            out.append(row | {"role": role})
        return out[1:] if self.drop_system and out and out[0]["role"] == "system" else out


def axolotl_datasets(entries: Any, where: str, method: str = "sft") -> list[AxolotlDataset]:
    """The datasets of an axolotl ``datasets:`` (or ``test_datasets:``) list, their types read as axolotl reads
    them for the training ``method`` (sft; a preference method: its ``rl:`` strategies).

    Raises:
        UsageError: an entry that is not a mapping, lacks ``path``, or asks what qlora does not do,
            naming ``where`` and the entry.
    """
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: axolotl's datasets is a list of mappings (path, type, ...); got {entries!r}.")
    out = []
    for k, entry in enumerate(entries):
        out += _entry(entry, f"{where}, datasets item {k + 1}", method)
    return out


def _entry(entry: Any, where: str, method: str) -> list[AxolotlDataset]:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise UsageError(f"{where}: each dataset is a mapping with a path (a hub id or a local file or folder).")
    entry = {k: v for k, v in entry.items() if v is not None}
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise UsageError(f"{where}: {', '.join(unknown)}: not an option qlora reads for a dataset (it reads "
                         f"{', '.join(sorted(_ENTRY_KEYS))}); remove {'it' if len(unknown) == 1 else 'them'}.")
    if entry.get("roles_to_train", ["assistant"]) != ["assistant"]:
        raise UsageError(f"{where}: roles_to_train {entry['roles_to_train']!r}: qlora trains the assistant turns "
                         "(train_on_inputs: true trains every token); remove roles_to_train.")
    for key in ("train_on_eos", "train_on_eot"):  # axolotl's train_on_eot defaults to train_on_eos (turn)
        if entry.get(key, "turn") != "turn":
            raise UsageError(f"{where}: {key} {entry[key]!r}: qlora trains the end of every trained turn (the "
                             "tokenizer's end markers and the config's eot_tokens), as train_on_eos and "
                             "train_on_eot: turn; remove the key.")
    if not isinstance(entry.get("drop_system_message", False), bool):
        raise UsageError(f"{where}: drop_system_message expects true or false; got {entry['drop_system_message']!r}.")
    if entry.get("ds_type", "json") not in _DS_TYPES:
        raise UsageError(f"{where}: ds_type {entry['ds_type']!r}: qlora reads {', '.join(_DS_TYPES)} files.")
    split, subset = str(entry.get("split", "train")), entry.get("name")
    files = entry.get("data_files", [entry["path"]])
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise UsageError(f"{where}: data_files must be a file or a list of files.")
    kind, extra = _kind(entry, where) if method == "sft" else _preference_kind(entry, where, method)
    name = entry["path"] if len(files) == 1 else None
    return [AxolotlDataset(name or f"{entry['path']}: {f}", f, split, subset, None, kind, **extra,
                           ds_type=str(entry.get("ds_type", ""))) for f in files]


def _kind(entry: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The row kind of an entry and the names and strings it reads."""
    kind = entry.get("type")
    if kind is None:
        return "", {}
    if is_preference_type(kind):
        raise UsageError(f"{where}: type {kind!r} is one of axolotl's preference strategies (DPO, ORPO, KTO): "
                         "it builds prompt/chosen/rejected rows for rl: dpo, ipo, orpo, simpo (or prompt/completion/"
                         "label rows for rl: kto). Set rl (or --method) to train on it, or give an SFT type.")
    if isinstance(kind, dict):
        unknown = sorted(set(kind) - set(_CUSTOM_FIELDS.values()) - set(_CUSTOM_DEFAULTS))
        if unknown:
            raise UsageError(f"{where}: type option {', '.join(unknown)}: a custom type reads "
                             f"{', '.join(sorted({*_CUSTOM_FIELDS.values(), *_CUSTOM_DEFAULTS}))}.")
        strings = _CUSTOM_DEFAULTS | {k: v for k, v in kind.items() if k in _CUSTOM_DEFAULTS and v is not None}
        if not all(isinstance(v, str) for v in strings.values()):
            raise UsageError(f"{where}: the type's format strings must be text.")
        system = strings.pop("system_prompt")
        columns = {ours: str(kind.get(key) or ours) for ours, key in _CUSTOM_FIELDS.items()}
        return "prompt", {"columns": columns, "prompt_format": strings | {"system": system, "system_no_input": system}}
    if isinstance(kind, str) and kind.split(":")[0] == "alpaca" and kind.partition(":")[2] in ("", *_ALPACA_STYLES):
        turn, no_input, system_format = _ALPACA_STYLES[kind.partition(":")[2] or "instruct"]
        return "prompt", {"columns": {k: k for k in ("instruction", "input", "output")},
                          "prompt_format": {"format": turn, "no_input_format": no_input, "system_format": system_format,
                                            "system": _PREAMBLE[0], "system_no_input": _PREAMBLE[1]}}
    if kind == "completion":
        return "text", {"columns": {"text": str(entry.get("field", "text"))}}
    if kind in ("chat_template", "sharegpt"):
        legacy = kind == "sharegpt"
        keys, theirs = message_mapping(entry, where, ("from", "value") if legacy else ("role", "content"),
                                       _DEFAULT_ROLES)
        columns = {"messages": str(entry.get("field_messages", "conversations" if legacy else "messages")),
                   "tools": str(entry.get("field_tools", "tools"))}
        return "chat", {"columns": columns, "message_keys": keys, "roles": theirs,
                        "drop_system": entry.get("drop_system_message", False)}
    raise UsageError(f"{where}: type {kind!r}: qlora reads axolotl's types {', '.join(TYPES)} and custom types "
                     "(a mapping of field_instruction, format, ...); convert the data to one of them, or to one of "
                     "qlora's own formats (messages, prompt/completion, text; prompt/chosen/rejected pairs for rl) "
                     "and drop type.")


def _preference_kind(entry: dict[str, Any], where: str, method: str) -> tuple[str, dict[str, Any]]:
    """An entry under a preference method: axolotl's strategy of its type; without one (or ``passthrough``)
    the rows are read as they are."""
    if entry.get("type") is None:
        return "", {}
    strategy = preference_strategy(entry, method, where)
    return ("preference", {"strategy": strategy}) if strategy else ("", {})


def declared_entries(spec: str) -> list[Any] | None:
    """The items of a ``--data`` given as a JSON list (how a config's ``datasets:`` list travels), else None."""
    if not spec.lstrip().startswith("["):
        return None
    try:
        items = json.loads(spec)
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None
