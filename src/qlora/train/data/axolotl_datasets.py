"""axolotl's ``datasets:`` entries: each a source with its own row type and field names.

An axolotl config lists its datasets as mappings: ``path`` (a hub id, a local file or folder;
``data_files`` with ``ds_type`` for local files under it), ``split``, ``name`` (the subset) and the
``type`` of its rows. Each row is rebuilt in the shape of one of qlora's own formats, as
axolotl's prompt strategy reads it:

- ``alpaca`` (or a mapping with ``field_instruction``/``field_input``/``field_output``/``field_system``
  for other column names): our alpaca format (the chat template renders it, ``template: alpaca``
  gives the alpaca prompt);
- a mapping with ``format`` (and ``no_input_format``, ``system_format``): axolotl's own prompt
  string, filled from the row, then the output as the completion (our prompt-completion format:
  only the output is trained);
- ``chat_template``: the ``field_messages`` column (default ``messages``) of messages whose keys
  ``message_property_mappings`` names (default ``role``/``content``; older configs:
  ``message_field_role``/``message_field_content``), their roles mapped by ``roles`` (default:
  user = human/user, assistant = gpt/assistant, system, tool); ``sharegpt`` (deprecated in axolotl)
  is the same over ``conversations`` with ``from``/``value``;
- ``completion``: the ``field`` column (default ``text``) trained whole (our text format).

Without ``type`` the file is read as it is, its format detected as for ``--data``. Options whose
effect qlora does not have (other ``roles_to_train``, ``train_on_eos``, per-message training
flags, a per-dataset chat template) are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.declared import DeclaredDataset

_DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"],
                  "tool": ["tool"]}
_OUR_ROLES = ("system", "user", "assistant", "tool")
_ALPACA_FIELDS = {"instruction": "field_instruction", "input": "field_input", "output": "field_output",
                  "system": "field_system"}
_CUSTOM_KEYS = {*_ALPACA_FIELDS.values(), "format", "no_input_format", "system_format", "system_prompt"}
_ENTRY_KEYS = {"path", "type", "split", "name", "data_files", "ds_type", "field_messages", "message_property_mappings",
               "message_field_role", "message_field_content", "roles", "roles_to_train", "train_on_eos", "field",
               "trust_remote_code", *_ALPACA_FIELDS.values()}
_DS_TYPES = ("json", "csv", "parquet", "arrow", "text")
TYPES = ("alpaca", "chat_template", "sharegpt", "completion")


@dataclass(frozen=True)
class AxolotlDataset(DeclaredDataset):
    """One ``datasets:`` entry of an axolotl config, with axolotl's defaults filled in."""

    kind: str  # alpaca, prompt (a custom format string), chat, text, or "" (read as it is)
    columns: dict[str, str] = field(default_factory=dict)  # our field -> their column
    message_keys: dict[str, str] = field(default_factory=dict)  # our message key -> theirs
    roles: dict[str, str] = field(default_factory=dict)  # their role -> ours
    prompt_format: dict[str, str] = field(default_factory=dict)  # format, no_input_format, system_format, system

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        if self.kind == "alpaca":
            row = {ours: fields.get(theirs) for ours, theirs in self.columns.items()}
            return {k: v for k, v in row.items() if v is not None or k in ("instruction", "output")}
        if self.kind == "prompt":
            return self._prompt_completion(fields, where)
        if self.kind == "chat":
            return {"messages": self._messages(fields, where)}
        if self.kind == "text":
            return {"text": fields.get(self.columns["text"])}
        return fields

    def _prompt_completion(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        values = {ours: fields.get(theirs) for ours, theirs in self.columns.items()}
        for key in ("instruction", "output"):
            if not isinstance(values.get(key), str):
                raise UsageError(f"{where}: column {self.columns[key]!r} must be a string (axolotl's {key}).")
        pattern = self.prompt_format["format"]
        if not values.get("input") and "no_input_format" in self.prompt_format:
            pattern = self.prompt_format["no_input_format"]
        prompt = pattern.format(instruction=values["instruction"], input=values.get("input") or "")
        system = values.get("system") or self.prompt_format.get("system_prompt")
        if system:
            prompt = self.prompt_format.get("system_format", "{system}").format(system=system) + prompt
        return {"prompt": prompt, "completion": values["output"]}

    def _messages(self, fields: dict[str, Any], where: str) -> list[dict[str, Any]]:
        raw = fields.get(self.columns["messages"])
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise UsageError(f"{where}: column {self.columns['messages']!r} must be a list of messages (objects).")
        out = []
        for k, message in enumerate(raw):
            speaker = message.get(self.message_keys["role"])
            if speaker not in self.roles:
                raise UsageError(f"{where}, message {k}: role {speaker!r} is not mapped by the dataset's roles "
                                 f"({', '.join(map(repr, self.roles))}); add it under roles: in the config.")
            out.append({ours: message[theirs] for ours, theirs in self.message_keys.items() if theirs in message}
                       | {"role": self.roles[speaker]})
        return out


def axolotl_datasets(entries: Any, where: str) -> list[AxolotlDataset]:
    """The datasets of an axolotl ``datasets:`` (or ``test_datasets:``) list.

    Raises:
        UsageError: an entry that is not a mapping, lacks ``path``, or asks what qlora does not do,
            naming ``where`` and the entry.
    """
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{where}: axolotl's datasets is a list of mappings (path, type, ...); got {entries!r}.")
    out = []
    for k, entry in enumerate(entries):
        out += _entry(entry, f"{where}, datasets item {k + 1}")
    return out


def _entry(entry: Any, where: str) -> list[AxolotlDataset]:
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
    if entry.get("train_on_eos", "turn") != "turn":
        raise UsageError(f"{where}: train_on_eos {entry['train_on_eos']!r}: qlora trains the end of every trained "
                         "turn, as train_on_eos: turn; remove the key.")
    if entry.get("ds_type", "json") not in _DS_TYPES:
        raise UsageError(f"{where}: ds_type {entry['ds_type']!r}: qlora reads {', '.join(_DS_TYPES)} files.")
    split, subset = str(entry.get("split", "train")), entry.get("name")
    files = entry.get("data_files", [entry["path"]])
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise UsageError(f"{where}: data_files must be a file or a list of files.")
    kind, extra = _kind(entry, where)
    name = entry["path"] if len(files) == 1 else None
    return [AxolotlDataset(name or f"{entry['path']}: {f}", f, split, subset, None, kind, **extra) for f in files]


def _kind(entry: dict[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """The row kind of an entry and the names it reads."""
    kind = entry.get("type")
    if kind is None:
        return "", {}
    if isinstance(kind, dict):
        unknown = sorted(set(kind) - _CUSTOM_KEYS)
        if unknown:
            raise UsageError(f"{where}: type option {', '.join(unknown)}: qlora reads a custom type's "
                             f"{', '.join(sorted(_CUSTOM_KEYS))}.")
        columns = {ours: kind.get(key, ours) for ours, key in _ALPACA_FIELDS.items()}
        if "format" not in kind:
            return "alpaca", {"columns": columns}
        texts = {k: kind[k] for k in ("format", "no_input_format", "system_format", "system_prompt") if k in kind}
        if not all(isinstance(v, str) for v in texts.values()):
            raise UsageError(f"{where}: the type's format strings must be text.")
        return "prompt", {"columns": columns, "prompt_format": texts}
    if kind == "alpaca":
        return "alpaca", {"columns": {ours: entry.get(key, ours) for ours, key in _ALPACA_FIELDS.items()}}
    if kind == "completion":
        return "text", {"columns": {"text": str(entry.get("field", "text"))}}
    if kind in ("chat_template", "sharegpt"):
        legacy = kind == "sharegpt"
        keys = dict(entry.get("message_property_mappings") or {})
        keys.setdefault("role", entry.get("message_field_role", "from" if legacy else "role"))
        keys.setdefault("content", entry.get("message_field_content", "value" if legacy else "content"))
        roles = entry.get("roles", _DEFAULT_ROLES)
        if not isinstance(roles, dict) or not set(roles) <= set(_OUR_ROLES):
            raise UsageError(f"{where}: roles maps {', '.join(_OUR_ROLES)} to lists of the dataset's role names.")
        theirs = {str(t): ours for ours, names in roles.items() for t in ([names] if isinstance(names, str) else names)}
        messages = entry.get("field_messages", "conversations" if legacy else "messages")
        return "chat", {"columns": {"messages": str(messages)}, "message_keys": {k: str(v) for k, v in keys.items()},
                        "roles": theirs}
    raise UsageError(f"{where}: type {kind!r}: qlora reads axolotl's types {', '.join(TYPES)} and custom "
                     "field_instruction/field_input/field_output mappings; convert the data to one of them (or to a "
                     "messages, prompt/completion or text file) and drop type.")


def declared_entries(spec: str) -> list[Any] | None:
    """The items of a ``--data`` given as a JSON list (how a config's ``datasets:`` list travels), else None."""
    if not spec.lstrip().startswith("["):
        return None
    try:
        items = json.loads(spec)
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None
