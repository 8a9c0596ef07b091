"""``--data-fields``: the dataset's names for our fields, message keys and role values.

Datasets name the same things differently (``question``/``answer``, ``dialog``,
``from``/``value``, ``human``/``gpt``). Rather than guess from names that can
mean several things (a ``question``/``answer`` dataset often has a ``context``
the model needs, which a guess would silently drop), qlora auto-detects only
unambiguous layouts and lets the user say the rest in one option::

    --data-fields instruction=question,output=answer
    --data-fields messages=dialog,role=speaker,content=text,user=human,assistant=bot

Each item is ``OURS=THEIRS``: a column (alpaca, chat, ShareGPT, prompt-completion and
text fields, ``reasoning``: the reasoning trace beside an alpaca or prompt-completion answer, and the
preference and KTO fields ``chosen``, ``rejected``, ``label``),
a key inside messages (``role``, ``content``), or a role value (``user``,
``assistant``, ``tool``, ``developer``; ``system_role`` for the system role's name,
since ``system`` is the alpaca/ShareGPT system column).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.sources import Record

COLUMNS = ("instruction", "input", "output", "system", "history", "messages", "conversations", "prompt",
           "completion", "text", "tools", "reasoning", "chosen", "rejected", "label")
# Speaker names seen in the wild (ShareGPT, glaive, LLaMA-Factory, OpenAI), mapped to chat roles.
# ``function_call`` is an assistant turn whose value is the tool call(s) as JSON.
ROLE_NAMES = {
    "system": "system",
    "developer": "developer",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "function_response": "tool",
    "ipython": "tool",
}
MESSAGE_KEYS = ("role", "content")


def speaker_name(speaker: str) -> str:
    """A speaker as :data:`ROLE_NAMES` spells it: lowercase, ``-`` as ``_`` (Locutusque/function-calling-chatml
    writes ``function-call`` and ``function-response``)."""
    return speaker.lower().replace("-", "_")
ROLE_VALUES = {"user": "user", "assistant": "assistant", "tool": "tool", "developer": "developer",
               "system_role": "system"}

# Names that suggest a prompt or an answer column, for the error that suggests a mapping.
# "instruction" before "input": beside an instruction, an input is its context (alpaca's columns, other-cased)
_PROMPT_NAMES = ("question", "query", "prompt", "instruction", "input", "inputs", "problem", "human", "user", "request",
                 "q")
_ANSWER_NAMES = ("answer", "answers", "response", "output", "completion", "solution", "target", "targets", "assistant",
                 "gpt", "reply", "chosen", "a")
# Words in a column name that say it holds an answer (``response_0``, ``chosen_response``, ``completions``).
_ANSWER_WORDS = ("answer", "response", "output", "completion", "solution", "target", "reply", "chosen", "rejected",
                 "assistant", "messages", "conversation", "text")
# Columns holding a context the prompt refers to (a passage, a table's schema), for the suggested input=COLUMN.
_CONTEXT_NAMES = ("context", "input", "passage", "document")


@dataclass(frozen=True)
class FieldMap:
    """A parsed ``--data-fields``; the empty map changes nothing."""

    columns: dict[str, str] = field(default_factory=dict)  # ours -> theirs
    keys: dict[str, str] = field(default_factory=dict)  # "role"/"content" -> theirs
    roles: dict[str, str] = field(default_factory=dict)  # their value (lowercase) -> our role

    def rename(self, record: Record) -> Record:
        """``record`` with the mapped columns under our names.

        Raises:
            UsageError: the row lacks a mapped column (naming its file and line).
        """
        if not self.columns:
            return record
        fields = dict(record.fields)
        for ours, theirs in self.columns.items():
            if theirs not in record.fields:
                raise UsageError(f"{record.where}: --data-fields maps {ours}={theirs}, but this row has no field "
                                 f"{theirs!r}; its fields are {sorted(record.fields)}.")
            fields.pop(ours, None)
        for theirs in self.columns.values():  # renamed, not copied: the old name must not decide the format
            fields.pop(theirs, None)
        for ours, theirs in self.columns.items():
            fields[ours] = record.fields[theirs]
        return replace(record, fields=fields)

    def message_keys(self, item: dict[str, Any]) -> tuple[str, str]:
        """The role and content keys of a message: as mapped, else role/content or from/value, whichever it has."""
        if "role" not in self.keys and "content" not in self.keys and "role" not in item and "from" in item:
            return "from", "value"
        return self.keys.get("role", "role"), self.keys.get("content", "content")

    def role(self, speaker: str) -> str | None:
        """Our role for a role value of the dataset (mapped first, then the known names), or None."""
        name = speaker.lower()
        return self.roles.get(name) or ROLE_NAMES.get(speaker_name(speaker))


def parse_data_fields(spec: str | dict | FieldMap | None) -> FieldMap:
    """Parse ``--data-fields`` (``"ours=theirs,..."``, or a YAML mapping; a :class:`FieldMap` is returned as is).

    Raises:
        UsageError: an item not of the form OURS=THEIRS, an unknown OURS (listing the valid ones), or a repeat.
    """
    if isinstance(spec, FieldMap):
        return spec
    if not spec:
        return FieldMap()
    items = list(spec.items()) if isinstance(spec, dict) else [
        tuple(part.split("=", 1)) if "=" in part else (part, "") for part in str(spec).split(",") if part.strip()]
    columns, keys, roles, seen = {}, {}, {}, set()
    for ours, theirs in items:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if not ours or not theirs:
            raise UsageError(f"--data-fields: {ours or theirs!r} is not of the form OURS=THEIRS (e.g. "
                             "instruction=question,output=answer).")
        if ours in seen:
            raise UsageError(f"--data-fields: {ours} is mapped twice.")
        seen.add(ours)
        if ours in COLUMNS:
            columns[ours] = theirs
        elif ours in MESSAGE_KEYS:
            keys[ours] = theirs
        elif ours in ROLE_VALUES:
            roles[theirs.lower()] = ROLE_VALUES[ours]
        else:
            raise UsageError(
                f"--data-fields: unknown name {ours!r}. Valid names: columns {', '.join(COLUMNS)}; message keys "
                f"{', '.join(MESSAGE_KEYS)}; role values {', '.join(ROLE_VALUES)} (each as OURS=THEIRS, e.g. "
                "instruction=question,output=answer or role=from,content=value,user=human).")
    return FieldMap(columns, keys, roles)


def prompt_column(fields: dict[str, Any]) -> str | None:
    """The row's column whose name suggests a prompt (``question``, ``query``, ...), or None."""
    return _named_column(fields, _PROMPT_NAMES)


def _named_column(fields: dict[str, Any], names: tuple[str, ...], skip: tuple[str | None, ...] = ()) -> str | None:
    """The row's column named one of ``names`` (in their order), else the first whose last ``_`` part is one of
    them (``generated_solution``, ``deepseek_solution``), or None. A one-letter name (``q``, ``a``) is matched
    whole only: as a last part it tells which of two things a column is (Chatbot Arena's ``model_a``, a model's
    name, beside ``conversation_a``), not that it is an answer."""
    lowered = {k.lower(): k for k in fields if k not in skip}
    exact = next((lowered[n] for n in names if n in lowered), None)
    return exact or next((k for k in fields if k not in skip and "_" in k
                          and len(last := k.lower().rsplit("_", 1)[-1]) > 1 and last in names), None)


def _reasoning_column(fields: dict[str, Any]) -> str | None:
    """A text column whose name says it holds a reasoning trace (``deepseek_reasoning``,
    ``deepseek_thinking_trajectory``), not a mode flag such as Nemotron's ``"reasoning": "on"``."""
    return next((k for k, v in fields.items() if any(w in k.lower() for w in ("reasoning", "thinking"))
                 and isinstance(v, str) and v.strip().lower() not in ("", "on", "off")), None)


def prompt_only(fields: dict[str, Any]) -> bool:
    """A row holding a prompt and nothing that could answer it (no other column named like an answer, such as
    PKU-SafeRLHF's ``response_0``, and no other message list): TRL's prompt-only data, for online methods."""
    others = [k for k in fields if k != "prompt"]
    return isinstance(fields.get("prompt"), (str, list)) and not any(
        any(n in k.lower() for n in _ANSWER_WORDS) or message_like(fields[k]) for k in others)


def prompt_only_error(where: str) -> UsageError:
    return UsageError(
        f'{where}: these rows hold only a "prompt" (TRL\'s prompt-only format): such data is for online methods '
        "(GRPO, online DPO, PPO), which generate the answers while training. qlora trains on written answers "
        '(--method sft, dpo, orpo, cpo, simpo, kto): write them into the rows first (a "completion" column for SFT, '
        '"chosen" and "rejected" for preference pairs, "completion" and a true/false "label" for KTO).')


def stepwise(fields: dict[str, Any]) -> bool:
    """A row of TRL's stepwise-supervision data: ``completions`` (reasoning steps) and a ``labels`` list."""
    return _listed_texts(fields.get("completions")) and isinstance(fields.get("labels"), list)


def unsupported_rows(fields: dict[str, Any], where: str) -> UsageError | None:
    """The refusal of a row whose data trains something qlora does not (an online method's prompts, a process
    reward model's steps), or None. It says what the data is for, so no format or mapping is suggested."""
    if prompt_only(fields):
        return prompt_only_error(where)
    if stepwise(fields):
        return UsageError(
            f'{where}: these rows are TRL\'s stepwise-supervision data ("prompt", "completions" steps and their '
            '"labels"), which trains process reward models; qlora does not train those.')
    return None


def named_prompt(fields: dict[str, Any]) -> str | None:
    """The one column named as a prompt exactly (``instruction``, ``input``, ``question``, ...; a text or a
    message list) of a row without ``prompt``, or None: several such names (``instruction`` and ``input``) leave
    the prompt to the user."""
    if "prompt" in fields:
        return None
    named = [k for k, v in fields.items() if k.lower() in _PROMPT_NAMES and (isinstance(v, str) or message_like(v))]
    return named[0] if len(named) == 1 else None


def _answer_column(fields: dict[str, Any], side: str) -> str | None:
    """The one text or message-list column named for the ``side`` answer (``chosen_response``), or None; beside
    ``chosen_model`` the answer is the one whose name also says answer."""
    named = [k for k, v in fields.items()
             if k != side and side in k.lower() and (isinstance(v, str) or message_like(v))]
    answers = [k for k in named if any(w in k.lower() for w in _ANSWER_WORDS if w not in ("chosen", "rejected"))]
    picked = answers or named
    return picked[0] if len(picked) == 1 else None


def pair_hint(fields: dict[str, Any]) -> str:
    """A sentence naming the --data-fields mapping of a preference row whose prompt, chosen and rejected answers
    are under other names the names make clear (argilla's ``instruction``, ``chosen_response``,
    ``rejected_response``), or '' when an answer's column is not clear."""
    said, mapping = [], []
    prompt = named_prompt(fields)
    if prompt:
        said.append(f"{prompt!r} is the prompt")
        mapping.append(f"prompt={prompt}")
    answers = {side: side if side in fields else _answer_column(fields, side) for side in ("chosen", "rejected")}
    if not all(answers.values()):
        return ""
    moved = [side for side, column in answers.items() if column != side]
    said += [f"{answers[side]!r} the {side} answer" for side in moved]
    mapping += [f"{side}={answers[side]}" for side in moved]
    if not mapping:
        return ""
    roles = ", ".join(said[:-1]) + " and " + said[-1] if len(said) > 1 else said[0]
    return f" If {roles}, map them with --data-fields {','.join(mapping)}."


def suggest_fields(fields: dict[str, Any]) -> str:
    """A sentence suggesting a --data-fields mapping for a row no format matched ('' if none fits)."""
    padded = [k for k in fields if k != k.strip()]
    if padded:  # a CSV header written "instruction, input, output": its names are " input", " output"
        return (f"The column name{'s' * (len(padded) > 1)} {', '.join(map(repr, padded))} "
                f"{'have' if len(padded) > 1 else 'has'} spaces around {'them' if len(padded) > 1 else 'it'} (a CSV "
                'header written "a, b" keeps the space after the comma): remove the spaces from the header. ')
    system = system_column(fields)
    lists = [k for k, v in fields.items() if message_like(v)]
    answers = [k for k in (_named_column({k: v for k, v in fields.items() if k not in lists and isinstance(v, str)},
                                         _ANSWER_NAMES),) if k]
    if lists and answers:  # the conversation so far, and the reply to it (nvidia's Nemotron post-training data)
        return (f"If {lists[0]!r} holds the conversation so far and {answers[0]!r} the reply to train, map them with "
                f"--data-fields prompt={lists[0]},completion={answers[0]}{system}. ")
    if lists:
        return (f"The field {lists[0]!r} holds a list of objects: if it is the conversation, map it with "
                f"--data-fields messages={lists[0]} (and role=KEY,content=KEY if its entries use other keys). ")
    turns = next((k for k, v in fields.items() if isinstance(v, list) and len(v) >= 2
                  and all(isinstance(t, str) for t in v)), None)
    if turns:  # stingning/ultrachat's "data": the turns as plain strings, user first
        return (f"The field {turns!r} holds a list of texts: if they are a conversation's turns (user first, then "
                f"alternating with the assistant), map it with --data-fields messages={turns}. ")
    prompt = prompt_column(fields)
    answer = _named_column(fields, _ANSWER_NAMES, skip=(prompt,))
    if prompt and answer and tool_calls(fields[answer]) is not None:
        return (f"If {prompt!r} is the prompt and {answer!r} the tool calls that answer it, map them with "
                f"--data-fields prompt={prompt},completion={answer}: the calls are then the assistant's tool-call "
                "turn, and a \"tools\" column is given to the chat template. ")
    if prompt and answer:
        context = _named_column(fields, _CONTEXT_NAMES, skip=(prompt, answer))
        reasoning = _reasoning_column({k: v for k, v in fields.items() if k not in (prompt, answer)})
        mapping = [f"{ours}={theirs}" for ours, theirs in (("instruction", prompt), ("input", context),
                                                          ("output", answer), ("reasoning", reasoning))
                   if theirs and ours != theirs]
        roles = [f"{prompt!r} is the prompt", f"{context!r} its context" if context else "",
                 f"{answer!r} the answer", f"{reasoning!r} its reasoning" if reasoning else ""]
        roles = [r for r in roles if r]
        said = ", ".join(roles[:-1]) + " and " + roles[-1]
        hint = "" if context or prompt.lower() == "input" else " (add input=COLUMN for a context the model must see)"
        return (f"If {said}, map them with --data-fields {','.join(mapping)}{system}{hint}; such names are not "
                "mapped automatically because datasets that use them often carry other columns the model needs. ")
    texts = [k for k, v in fields.items() if isinstance(v, str) and v.strip()]
    if texts:
        longest = max(texts, key=lambda k: len(fields[k]))
        return (f"If {longest!r} holds text to train on whole (as in pre-training), map it with --data-fields "
                f"text={longest}; if the rows hold a prompt and an answer, map them with --data-fields "
                "instruction=COLUMN,output=COLUMN. ")
    return "Map your fields with --data-fields OURS=THEIRS (e.g. instruction=question,output=answer). "


def _listed_texts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)


def system_column(fields: dict[str, Any]) -> str:
    """``,system=COLUMN`` for a row's system-prompt column under another name (``system_prompt``, as Open-Orca
    writes it), to append to a suggested mapping ('' if none)."""
    column = next((k for k in fields if k != "system" and "system" in k.lower()
                   and (fields[k] is None or isinstance(fields[k], str))), None)
    return f",system={column}" if column else ""


def message_like(value: Any) -> bool:
    """A non-empty list of objects whose values are text (or null; a ``weight`` a number): what a conversation's
    messages look like, unlike lists of scored annotations."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and len(m) >= 2
        and all(v is None or isinstance(v, str) or (k == "weight" and isinstance(v, (int, float)))
                for k, v in m.items()) for m in value)


def tool_calls(value: Any) -> list[dict[str, Any]] | None:
    """``value`` as a list of tool calls (``{"name", "arguments"}`` or ``"parameters"`` objects without a role,
    also as a JSON string), or None: how tool-calling datasets such as xlam store an answer."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, list) and value and all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and "role" not in c
            and ("arguments" in c or "parameters" in c) for c in value):
        return value
    return None
