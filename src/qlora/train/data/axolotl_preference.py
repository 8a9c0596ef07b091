"""axolotl's prompt strategies for preference data: the ``type`` of a dataset under ``rl:``.

Under ``rl: dpo`` (and ipo, simpo, orpo) axolotl builds each row's ``prompt``, ``chosen`` and ``rejected``
with a DPO strategy, under ``rl: kto`` its ``prompt``, ``completion`` (and ``label``) with a KTO strategy; the
same name reads different columns in each (``chatml.intel``: ``question`` with ``chosen``/``rejected``, or
with ``completion``). Each is rebuilt here as axolotl writes it:

- ``chatml.*`` and ``llama3.*``: the prompt in the family's markup (``<|im_start|>user\\n...<|im_end|>\\n
  <|im_start|>assistant\\n``; ``<|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>...``), after a system
  turn when the row's ``system`` is set, and each answer followed by the turn's end (``<|im_end|>``,
  ``<|eot_id|>``): plain-text rows, trained as they are. DPO reads ``default`` (the prompt from ``prompt``,
  ``input``, ``question`` or ``instruction``, the answers from ``chosen``/``rejected`` or
  ``chosen_response``/``rejected_response``; ``chatml.argilla``, its name before axolotl renamed it, too),
  ``argilla_chat`` (``chosen``/``rejected`` conversations: the first message is the prompt, the second the
  answer), ``icr`` (``input``), ``intel`` (``question``), ``prompt_pairs`` and ``ultra`` (``prompt``; ultra's
  answers the second message of the ``chosen``/``rejected`` conversations). KTO reads ``argilla``
  (``instruction``), ``argilla_chat`` (the ``completion`` conversation), ``intel``, ``prompt_pairs``, ``ultra``;
- ``chat_template.default`` (DPO): the ``field_messages`` conversation (a string: one user message) as the
  prompt, and the ``field_chosen``/``field_rejected`` answers (a string, a message, or a conversation whose
  last message is the answer), their keys named by ``message_property_mappings`` and roles mapped by
  ``roles`` (default: user, assistant, system, tool as they are); ``chat_template.argilla_chat``: the prompt
  is the ``chosen`` conversation but its last message; ORPO's ``chat_template.argilla``: its system, the
  ``chosen`` conversation's turns (each user message the row's ``prompt`` when it has one) and the last
  answers. These are message rows, rendered with the run's chat template (axolotl's ``chat_template``), as
  axolotl renders them;
- a mapping (axolotl's ``user_defined.default``): DPO's ``field_prompt``, ``field_system``, ``field_chosen``,
  ``field_rejected`` and ``prompt_format`` (``{prompt}``, ``{system}``), ``chosen_format``,
  ``rejected_format``; KTO's ``field_completion``, ``field_label`` and ``completion_format`` in place of
  the answers'. A ``{system}`` without a system in the row is empty (axolotl's KTO would stop there);
- ``passthrough``: rows already prompt/chosen/rejected, read as they are.

axolotl's other strategies (``zephyr.nectar``, a module of one's own) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UsageError

# A family's markup: the system turn, the user turn up to the answer, and the end of an answer.
_MARKUP = {
    "chatml": (lambda s: f"<|im_start|>system\n{s}<|im_end|>\n",
               lambda p: f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": (lambda s: f"<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>",
               lambda p: f"<|start_header_id|>user<|end_header_id|>\n\n{p}<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}
# The prompt column of each markup strategy (None: read from the conversation); "default" takes the first present.
_DPO_PROMPT = {"default": ("prompt", "input", "question", "instruction"), "argilla": ("prompt", "input", "question",
               "instruction"), "argilla_chat": None, "icr": ("input",), "intel": ("question",),
               "prompt_pairs": ("prompt",), "ultra": ("prompt",)}
_KTO_PROMPT = {"argilla": ("instruction",), "argilla_chat": None, "intel": ("question",),
               "prompt_pairs": ("prompt",), "ultra": ("prompt",)}
DPO_TYPES = tuple(f"{family}.{name}" for family in _MARKUP for name in _DPO_PROMPT) + (
    *_MARKUP, "chat_template", "chat_template.default", "chat_template.argilla_chat", "chat_template.argilla",
    "passthrough")
KTO_TYPES = tuple(f"{family}.{name}" for family in _MARKUP for name in _KTO_PROMPT)
_DPO_KEYS = ("field_prompt", "field_system", "field_chosen", "field_rejected", "prompt_format", "chosen_format",
             "rejected_format")
_KTO_KEYS = ("field_prompt", "field_system", "field_completion", "field_label", "prompt_format", "completion_format")
_DEFAULT_ROLES = {"user": ["user"], "assistant": ["assistant"], "system": ["system"], "tool": ["tool"]}


@dataclass(frozen=True)
class PreferenceStrategy:
    """One axolotl preference strategy with the names and strings its dataset entry gives it."""

    name: str  # e.g. "chatml.intel", "chat_template.default", "user_defined"
    unpaired: bool  # KTO's (prompt, completion, label) rather than DPO's pairs
    options: dict[str, Any] = field(default_factory=dict)

    def row(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        """The row as axolotl's strategy rebuilds it, in the shape of qlora's preference (or KTO) rows."""
        family, _, kind = self.name.partition(".")
        if family in _MARKUP:
            return self._markup(fields, where, *_MARKUP[family], kind or "default")
        if self.name == "user_defined":
            return self._user_defined(fields, where)
        if self.name == "chat_template.argilla":
            return _orpo_argilla(fields, where)
        return self._chat_template(fields, where)

    def _markup(self, fields: dict[str, Any], where: str, system_turn, user_turn, end: str, kind: str) -> dict:
        answers = ("completion",) if self.unpaired else ("chosen", "rejected")
        columns = (_KTO_PROMPT if self.unpaired else _DPO_PROMPT)[kind]
        if columns is None:  # argilla_chat: the first message of the (chosen) conversation is the prompt
            prompt = user_turn(_content(fields, answers[0], 0, where))
            texts = [_content(fields, a, 1, where) for a in answers]
        else:
            prompt_column = next((c for c in columns if c in fields), columns[-1])
            system = fields.get("system")
            prompt = (system_turn(system) if system else "") + user_turn(_text(fields, prompt_column, where))
            if kind == "ultra" and not self.unpaired:
                texts = [_content(fields, a, 1, where) for a in answers]
            else:
                if kind in ("default", "argilla") and not self.unpaired:
                    answers = tuple(a if a in fields else f"{a}_response" for a in answers)
                texts = [_text(fields, a, where) for a in answers]
        if self.unpaired:
            return {"prompt": prompt, "completion": texts[0] + end, "label": fields.get("label")}
        return {"prompt": prompt, "chosen": texts[0] + end, "rejected": texts[1] + end}

    def _user_defined(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        o = self.options
        values = {"prompt": _text(fields, o["field_prompt"], where), "system": fields.get(o["field_system"]) or ""}
        prompt = o["prompt_format"].format(**values)
        if self.unpaired:
            return {"prompt": prompt, "completion": o["completion_format"].format(
                completion=_text(fields, o["field_completion"], where)), "label": fields.get(o["field_label"])}
        return {"prompt": prompt, **{k: o[f"{k}_format"].format(**{k: _text(fields, o[f"field_{k}"], where)})
                                     for k in ("chosen", "rejected")}}

    def _chat_template(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        o = self.options
        chosen, rejected = (fields.get(o[k]) for k in ("field_chosen", "field_rejected"))
        if self.name == "chat_template.argilla_chat":
            if not isinstance(chosen, list) or not chosen:
                raise UsageError(f"{where}: column {o['field_chosen']!r} must be a conversation (a list of messages; "
                                 "axolotl's chat_template.argilla_chat).")
            prompt = chosen[:-1]
        else:
            prompt = fields.get(o["field_messages"])
            if isinstance(prompt, str):
                prompt = [{o["role"]: "user", o["content"]: prompt}]
        if not isinstance(prompt, list):
            raise UsageError(f"{where}: column {o['field_messages']!r} must be a conversation (a list of messages) or "
                             "a string (axolotl's chat_template.default).")
        out = {"prompt": [self._message(m, where) for m in prompt]}
        for key, raw in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(raw, str):
                raw = {o["role"]: "assistant", o["content"]: raw}
            elif isinstance(raw, list) and raw:
                raw = raw[-1]
            if not isinstance(raw, dict):
                raise UsageError(f"{where}: column {o[f'field_{key}']!r} must be a string, a message or a "
                                 "conversation (axolotl's chat_template strategies).")
            out[key] = [self._message(raw, where)]
        return out

    def _message(self, message: Any, where: str) -> dict[str, Any]:
        o = self.options
        if not isinstance(message, dict) or o["role"] not in message or o["content"] not in message:
            raise UsageError(f"{where}: each message needs the keys {o['role']!r} and {o['content']!r} (the "
                             f"dataset's message_property_mappings); got {message!r}.")
        role = message[o["role"]]
        if role not in o["roles"]:
            raise UsageError(f"{where}: role {role!r} is not mapped by the dataset's roles "
                             f"({', '.join(map(repr, o['roles']))}); map it under roles: in the config, as axolotl "
                             "requires.")
        return {"role": o["roles"][role], "content": message[o["content"]]}


def _text(fields: dict[str, Any], column: str, where: str) -> str:
    value = fields.get(column)
    if not isinstance(value, str):
        raise UsageError(f"{where}: column {column!r} must be a string (axolotl's strategy reads it); "
                         f"{'the row has no such column' if value is None else f'got {value!r}'}.")
    return value


def _content(fields: dict[str, Any], column: str, index: int, where: str) -> str:
    """The content of message ``index`` of the conversation in ``column``."""
    value = fields.get(column)
    if not (isinstance(value, list) and len(value) > index and isinstance(value[index], dict)
            and isinstance(value[index].get("content"), str)):
        raise UsageError(f"{where}: column {column!r} must be a conversation whose message {index + 1} has a "
                         "string content (axolotl's strategy takes the prompt from the first message and the "
                         "answer from the second).")
    return value[index]["content"]


def _orpo_argilla(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """ORPO's chat_template.argilla: system, the chosen conversation's turns but the last answer (each user
    message the row's ``prompt`` when it has one), then the chosen and rejected last answers."""
    chosen, rejected = fields.get("chosen"), fields.get("rejected")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                          for m in value)):
            raise UsageError(f"{where}: column {key!r} must be a conversation of messages with string content "
                             "(axolotl's ORPO chat_template.argilla).")
    if len(chosen) % 2:
        raise UsageError(f"{where}: column 'chosen' has {len(chosen)} messages; axolotl's chat_template.argilla "
                         "reads user/assistant turns, an even number.")
    prompt = [{"role": "system", "content": fields["system"]}] if fields.get("system") else []
    turns = len(chosen) // 2
    for i in range(turns):
        prompt.append({"role": "user", "content": _text(fields, "prompt", where) if "prompt" in fields
                       else chosen[2 * i]["content"]})
        if i < turns - 1:
            prompt.append({"role": "assistant", "content": chosen[2 * i + 1]["content"]})
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen[-1]["content"]}],
            "rejected": [{"role": "assistant", "content": rejected[-1]["content"]}]}


def preference_strategy(entry: dict[str, Any], method: str, where: str) -> PreferenceStrategy | None:
    """The strategy of a dataset entry under a preference ``method`` (kto: axolotl's KTO strategies, any other:
    its DPO and ORPO ones), or None for ``passthrough`` (rows read as they are).

    Raises:
        UsageError: a type axolotl does not have for this method, or a mapping with keys it does not read.
    """
    kind, unpaired = entry.get("type"), method == "kto"
    if isinstance(kind, dict):
        keys = _KTO_KEYS if unpaired else _DPO_KEYS
        unknown = sorted(set(kind) - set(keys))
        if unknown:
            raise UsageError(f"{where}: type option {', '.join(unknown)}: axolotl's user-defined "
                             f"{'KTO' if unpaired else 'DPO'} type reads {', '.join(keys)}.")
        given = {k: v for k, v in kind.items() if v}  # axolotl: an empty format is the default one
        defaults = {"prompt_format": "{prompt}", "chosen_format": "{chosen}", "rejected_format": "{rejected}",
                    "completion_format": "{completion}"}
        options = {k: given.get(k, defaults.get(k) or k.removeprefix("field_")) for k in keys}
        if not all(isinstance(v, str) for v in options.values()):
            raise UsageError(f"{where}: the type's field names and formats must be text.")
        for key in keys:
            if key.endswith("_format"):
                _check_format(options[key], key, where)
        return PreferenceStrategy("user_defined", unpaired, options)
    known = KTO_TYPES if unpaired else DPO_TYPES
    if kind == "passthrough" and not unpaired:
        return None
    if kind not in known:
        other = "DPO" if unpaired else "KTO"
        also = (f" ({kind!r} is one of its {other} strategies: rl: {'dpo' if unpaired else 'kto'})"
                if kind in (DPO_TYPES if unpaired else KTO_TYPES) else "")
        raise UsageError(f"{where}: type {kind!r}: not one of axolotl's {'KTO' if unpaired else 'DPO/ORPO'} "
                         f"strategies that qlora reads{also}: {', '.join(known)}, or a mapping (user_defined: "
                         f"{', '.join(_KTO_KEYS if unpaired else _DPO_KEYS)}). Convert the data to "
                         f"{'prompt/completion/label rows' if unpaired else 'prompt/chosen/rejected rows'} and drop "
                         "type.")
    name = f"{kind}.default" if kind in (*_MARKUP, "chat_template") else kind
    if not name.startswith("chat_template"):
        return PreferenceStrategy(name, unpaired)
    keys, theirs = message_mapping(entry, where, ("role", "content"), _DEFAULT_ROLES)
    return PreferenceStrategy(name, unpaired, {
        "field_messages": str(entry.get("field_messages", "messages")), "field_chosen": str(entry.get(
            "field_chosen", "chosen")), "field_rejected": str(entry.get("field_rejected", "rejected")),
        "role": keys["role"], "content": keys["content"], "roles": theirs})


def message_mapping(entry: dict[str, Any], where: str, default_keys: tuple[str, str],
                    default_roles: dict[str, list[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """An entry's message keys (``message_property_mappings``, or the older ``message_field_role`` and
    ``message_field_content``; else ``default_keys``) and its roles, as {their name: our role}.

    Raises:
        UsageError: ``roles`` that is not a mapping.
    """
    keys = dict(entry.get("message_property_mappings") or {})
    keys.setdefault("role", entry.get("message_field_role") or default_keys[0])
    keys.setdefault("content", entry.get("message_field_content") or default_keys[1])
    roles = entry.get("roles", default_roles)
    if not isinstance(roles, dict):
        raise UsageError(f"{where}: roles maps a role (user, assistant, system, tool) to a list of the dataset's "
                         "names for it.")
    theirs = {str(t): ours for ours, names in roles.items() for t in ([names] if isinstance(names, str) else names)}
    return {k: str(v) for k, v in keys.items()}, theirs


def _check_format(text: str, key: str, where: str) -> None:
    """A format may name only its own fields (``{prompt}``, ``{system}``; ``{chosen}``, ...)."""
    allowed = {"prompt_format": ("prompt", "system")}.get(key, (key.removesuffix("_format"),))
    try:
        text.format(**{name: "" for name in allowed})
    except (KeyError, IndexError, ValueError) as err:
        raise UsageError(f"{where}: {key} {text!r} names a field it does not have ({err}); it may use "
                         f"{', '.join('{' + a + '}' for a in allowed)} (write {{{{ and }}}} for literal braces)."
                         ) from None


def is_preference_type(kind: Any) -> bool:
    """Whether a ``type`` names one of axolotl's preference strategies (which need ``rl:``)."""
    return isinstance(kind, str) and kind != "chat_template" and kind in (*DPO_TYPES, *KTO_TYPES) or (
        isinstance(kind, dict) and bool(set(kind) & {"field_prompt", "field_chosen", "field_rejected",
                                                     "field_completion", "field_label", "prompt_format"}))
