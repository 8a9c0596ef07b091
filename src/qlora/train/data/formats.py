"""Dataset formats and their normalization to conversations or raw text.

Users bring data in many shapes. Everything downstream (templates,
tokenization, loss masks) works on one shape only: an :class:`Example` holding
either a list of chat messages (``role``, ``content`` and, for tool use,
``tool_calls`` / ``tool_call_id`` / ``name``) or a raw text, so each format's
quirks are handled here and nowhere else:

- alpaca (``instruction``/``input``/``output``, optional ``system`` and
  LLaMA-Factory's ``history``), and Dolly (``instruction``/``context``/``response``);
- chat (``messages``, or a ``conversation`` list as lmsys-chat-1m names it) and ShareGPT
  (``conversations``), whatever their entries' keys (``role``/``content`` or ``from``/``value``),
  plain strings alternating user and assistant turns (LIMA), or ``{"input", "output"}`` or
  ``{"user", "assistant"}`` exchanges (a user turn and the assistant's reply each, as LDJnr/Capybara and
  HuggingFaceM4/the_cauldron's ``texts`` column write them), with content given as
  text parts, tool calls, tool results and a per-row ``tools`` column; glaive-function-calling's transcript
  strings (v2's ``system`` and ``chat``, v1's ``sample``: :mod:`qlora.train.data.glaive`);
- TRL's prompt-completion (``prompt``/``completion``: strings, or message lists; a completion that is
  a list of tool calls ``{"name", "arguments"}``, as in Salesforce/xlam-function-calling-60k, is the
  assistant's tool-call turn);
- plain ``text``;
- OpenAssistant's message trees, read as chat: each tree's top-ranked thread
  (:mod:`qlora.train.data.message_trees`).

Reasoning traces (an assistant message's ``reasoning_content``/``reasoning``/``thinking``, or such a
column beside an alpaca or prompt-completion answer) are kept under their own name; where they go
depends on the chat template (:mod:`qlora.chat.reasoning`).

Field names that differ are mapped by :mod:`qlora.train.data.fields` (``--data-fields``).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Sequence

from qlora.chat.example import Example
from qlora.chat.images import IMAGE_PART_TYPES, attach_images, refuse_media
from qlora.chat.pieces import is_written
from qlora.chat.reasoning import REASONING_KEYS, THINK_CLOSE, message_reasoning, split_think
from qlora.errors import UsageError
from qlora.template_kwargs import render_parameter
from qlora.train.data.fields import (ROLE_NAMES, FieldMap, named_prompt, pair_hint, parse_data_fields,
                                     speaker_name, suggest_fields, tool_calls, unsupported_rows)
from qlora.train.data.glaive import is_transcript, transcript, transcript_column
from qlora.train.data.message_trees import is_message_tree, top_threads
from qlora.train.data.sources import Record

FORMATS = ("alpaca", "chat", "sharegpt", "prompt-completion", "text")
ROLES = ("system", "developer", "user", "assistant", "tool")
_SYSTEM_ROLES = ("system", "developer")
DETECT_ROWS = 32  # rows inspected to detect the format: one atypical first row must not decide it

TEMPLATE_KWARGS_COLUMN = "chat_template_kwargs"  # TRL's per-row template variables
_TOOL_CALL_SPEAKERS = ("function_call",)
# One user turn and the assistant's reply in one entry: LDJnr/Capybara's, the_cauldron's (and FineVision's).
_EXCHANGE_KEYS = (("input", "output"), ("user", "assistant"))
EXCHANGES_COLUMN = "texts"  # the_cauldron's conversation: {"user", "assistant", "source"} exchanges


def unpaired_label(fields: dict[str, Any]) -> bool | None:
    """The true/false ``label`` of an unpaired preference row (TRL's KTO data: ``prompt``, ``completion``,
    ``label``), or None when the row has no such label. An integer 0 or 1 counts too (a column ``datasets`` reads
    as int64, which TRL's KTOTrainer takes as bool), and so do CSV/TSV cells ``true``/``false`` and ``0``/``1``."""
    label = fields.get("label")
    if isinstance(label, str) and label.strip().lower() in _LABEL_CELLS:
        return _LABEL_CELLS[label.strip().lower()]
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        return bool(label)
    return label if isinstance(label, bool) else None


_LABEL_CELLS = {"true": True, "false": False, "1": True, "0": False}


def row_format(fields: dict[str, Any]) -> str | None:
    """The format a row's fields look like (``"preference"`` for DPO pairs, ``"unpaired-preference"``
    for KTO rows), or None."""
    keys = set(fields)
    if is_written(fields.get("pieces")):
        return "pieces"
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "prompt" in keys and "completion" in keys and unpaired_label(fields) is not None:
        return "unpaired-preference"
    if ("messages" in keys or _listed(fields.get("conversation")) or is_transcript(fields)
            or _exchanges(fields.get(EXCHANGES_COLUMN))):
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def detect_format(record: Record | list[Record]) -> str:
    """The format of a dataset: the most common one among its first rows (ties: the first seen).

    Raises:
        UsageError: preference pairs (they train with --method dpo/orpo), unpaired preference rows with a
            true/false label (--method kto), or no row matches a format.
    """
    records = [record] if isinstance(record, Record) else record[:DETECT_ROWS]
    shapes = [row_format(r.fields) for r in records]
    found = Counter(f for f in shapes if f is not None)
    if not found:
        first = records[0]
        unsupported = unsupported_rows(first.fields, first.where)
        if unsupported:
            raise unsupported
        keys = sorted(first.fields)
        raise UsageError(
            f"{first.where}: cannot tell the data format from the fields {keys}"
            f"{f' (nor from the first {len(records)} rows)' if len(records) > 1 else ''}. Expected "
            '"instruction"/"output" (alpaca; Dolly\'s "instruction"/"context"/"response"), "messages" (chat), '
            '"conversations" (ShareGPT), "prompt"/"completion" (TRL prompt-completion) or "text". '
            f"{_nested_rows(first.fields) or suggest_fields(first.fields)}{_as_pairs(first.fields)}Or pass --format "
            "explicitly."
        )
    fmt = max(found, key=lambda f: (found[f], -shapes.index(f)))
    if fmt == "preference":
        first = records[shapes.index(fmt)]
        prompt = named_prompt(first.fields) if isinstance(first.fields["chosen"], str) else None
        mapped = f" (with --data-fields prompt={prompt})" if prompt else ""
        raise UsageError(
            f'{first.where}: these rows are preference pairs ("prompt", "chosen", "rejected"): train them with '
            f"--method dpo, orpo, cpo or simpo{mapped}. For supervised fine-tuning on the preferred answers, "
            f"{_sft_on_chosen(first.fields, prompt)}"
        )
    if fmt == "unpaired-preference":
        raise unpaired_error(records[shapes.index(fmt)].where)
    return fmt


def _nested_rows(fields: dict[str, Any]) -> str:
    """For a row that holds rows (a ``.json`` file's one object keeping its splits, ``{"train": [...], "test":
    [...]}``, or its examples under a name other than ``"data"``): where the rows are and how to give them ('' for
    other rows). Entries with a speaker (``role``, ``from``) are a conversation's messages, and entries with a
    ``text`` beside other fields may be too (``{"speaker", "text"}``): neither is taken for rows."""
    def rows_of(value: Any) -> str | None:
        if not (isinstance(value, list) and value and all(
                isinstance(item, dict) and not {"role", "from"} & item.keys() for item in value)):
            return None
        fmt = row_format(value[0])
        return fmt if fmt != "text" or all(item.keys() == {"text"} for item in value) else None

    held = {k: fmt for k, fmt in ((k, rows_of(v)) for k, v in fields.items()) if fmt is not None}
    if not held:
        return ""
    name, fmt = next(iter(held.items()))
    others = [k for k in held if k != name]
    also = (f" {', '.join(map(repr, others))} hold{'s' * (len(others) == 1)} rows too: give each list as its own "
            "file (a held-out one as --eval-data).") if others else ""
    return (f"The field {name!r} holds a list of {len(fields[name])} rows of the {fmt} format, not one example's "
            f"field: give that list alone as the data (e.g. jq '.{name}' FILE > {name}.json), or name it \"data\" "
            f"(a .json file's {{\"data\": [...]}} is read as its rows).{also} ")


def _as_pairs(fields: dict[str, Any]) -> str:
    """The mapping that reads a row as a preference pair, for rows whose columns name their answers
    (``chosen_response``, ``rejected_response``) ('' for others)."""
    hint = pair_hint(fields)
    return f"These rows also look like preference pairs (--method dpo, orpo, cpo, simpo or kto).{hint} " if hint else ""


def _sft_on_chosen(fields: dict[str, Any], prompt: str | None) -> str:
    """How to train a preference row's chosen answer with SFT, for the row's own shape (``prompt``: the column
    holding the prompt of text answers under another name, as argilla/distilabel-intel-orca-dpo-pairs'
    ``input``)."""
    if _listed(fields.get("messages")):
        return 'train the "messages" column these rows also have: --format chat.'
    if "prompt" in fields:
        return ('map them: --data-fields completion=chosen (the prompt-completion format; "rejected" is then '
                "ignored).")
    if prompt:
        mapping = ",".join(m for m in (f"instruction={prompt}", "output=chosen") if m != "instruction=instruction")
        return (f"{prompt!r} holds the prompt and \"chosen\" its answer: map them with --data-fields {mapping} "
                '(the alpaca format; "rejected" is then ignored).')
    if _listed(fields.get("chosen")):
        return ('"chosen" holds the whole conversation: --data-fields messages=chosen (its assistant messages are '
                'trained, "rejected" is ignored).')
    return ('"chosen" holds the whole text, prompt included: --data-fields text=chosen trains every token of it; to '
            "train only the answers, write the rows as conversations first.")


def unpaired_error(where: str) -> UsageError:
    """Rows with a true/false (or 1/0) ``label`` beside prompt/completion are never SFT data: the completions
    labelled false are answers the model must NOT learn to write."""
    return UsageError(
        f'{where}: these rows are unpaired preference data ("prompt", "completion" and a true/false or 1/0 "label", '
        "TRL's KTO format): supervised fine-tuning on them would also teach the completions labelled false. "
        "Train them with --method kto. For supervised fine-tuning on the desirable completions only, keep the rows "
        'whose label is true (1) and remove the "label" field.')


def normalize(records: list[Record], fmt: str = "auto", fields: FieldMap | str | None = None,
              dataset_dir: str | None = None, images: bool = True) -> list[Example]:
    """Normalize records of one format (``"auto"``: detected from the first rows).

    Args:
        records: the rows, as read by :func:`~qlora.train.data.sources.load_records`.
        fmt: ``"auto"`` or one of :data:`FORMATS`.
        fields: ``--data-fields``: the dataset's names for our fields, keys and roles.
        dataset_dir: ``--dataset-dir``, where image paths not found beside the data file are looked for.
        images: place and check the rows' images (False: image parts stay as written, for a caller that places
            them, as a preference pair's prompt does).

    Raises:
        UsageError: unknown format, a malformed --data-fields, or a record missing a field the format needs
            (naming its file and line).
    """
    if not records:
        raise UsageError("the dataset is empty; it needs at least one example.")
    names = parse_data_fields(fields)
    records = [names.rename(r) for r in records]
    if fmt in ("auto", "chat") and is_message_tree(records[0].fields):
        records = top_threads(records)
    how = "given with --format"
    if fmt == "auto":
        fmt = detect_format(records)
        how = f"detected from the first {min(len(records), DETECT_ROWS)} rows"
    if fmt not in FORMATS and not (fmt == "pieces" and how.startswith("detected")):
        raise UsageError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}.")
    convert: Callable[[dict[str, Any], str, FieldMap], Example] = _CONVERTERS[fmt]
    if fmt == "prompt-completion" and any(_system_prompt(r.fields) for r in records):
        convert = partial(_prompt_completion, chat=True)  # plain text has no place for a system prompt
    examples = []
    _note_unread_text(records, fmt, how)
    for r in records:
        refuse_media(r.fields, r.where)
        try:
            example = convert(r.fields, r.where, names)
            variables = row_template_kwargs(r.fields, r.where)
            if variables and example.messages is not None:  # plain text is not rendered by a template
                example = replace(example, template_kwargs=variables)
            folders = r.image_folders(dataset_dir)
            examples.append(_marked_empty(attach_images(example, r.fields, folders) if images else example))
        except UsageError as exc:
            own = row_format(r.fields)
            if own is None or own == fmt:
                raise
            raise UsageError(f"{exc} This row looks like the {own} format, but the dataset is {fmt} ({how}); "
                             "a dataset holds one format: convert or remove this row.") from None
    if fmt in ("chat", "sharegpt"):
        _note_system_column_unused(records, examples)
    return examples


def _note_unread_text(records: list[Record], fmt: str, how: str) -> None:
    """Say once that rows detected as another format also have a ``text`` column, which is not read: tatsu-lab/alpaca
    and vicgalle/alpaca-gpt4 hold each example written out in the Stanford prompt there, beside its columns. The
    columns are trained, as LLaMA-Factory and axolotl read them (with the model's chat template, the answer alone),
    where TRL's SFTTrainer would train the text whole."""
    if fmt == "text" or not how.startswith("detected"):
        return
    first = next((r for r in records[:DETECT_ROWS] if isinstance(r.fields.get("text"), str)
                  and row_format(r.fields) == fmt), None)
    if first is not None:
        print(f'qlora: {first.where}: the rows are read as the {fmt} format ({how}) and also have a "text" column, '
              "which is not read (the columns are trained, as LLaMA-Factory and axolotl read them); --format text "
              "trains that column instead.", file=sys.stderr)


def _note_system_column_unused(records: list[Record], examples: list[Example]) -> None:
    """Say once that rows with a ``system`` column begin with a system turn that differs from it: the turn is kept
    and the column not read, as LLaMA-Factory's ShareGPT reader and axolotl's chat_template read such rows (a
    conversation without a system turn first has the column put there)."""
    unused = [r.where for r, e in zip(records, examples) if not _glaive(r.fields) and e.messages
              and _system_prompt(r.fields) and e.messages[0]["role"] in _SYSTEM_ROLES
              and e.messages[0].get("content") != r.fields["system"]]
    if unused:
        many = f" (and {len(unused) - 1} more rows)" if len(unused) > 1 else ""
        print(f'qlora: {unused[0]}{many}: a "system" column beside a conversation that begins with a different '
              "system turn: the turn is used and the column not read, as LLaMA-Factory and axolotl read such rows; "
              "remove one of the two to choose.", file=sys.stderr)


def _alpaca(fields: dict[str, Any], where: str, names: FieldMap) -> Example:
    out_key = "output" if fields.get("output") is not None or "response" not in fields else "response"
    in_key = "input" if fields.get("input") is not None or "context" not in fields else "context"
    instruction = _cell_text(fields, "instruction", where, "alpaca")
    output = _cell_text(fields, out_key, where, "alpaca")
    extra = _cell_text(fields, in_key, where, "alpaca") if in_key in fields else ""
    messages: list[dict[str, Any]] = []
    if fields.get("system"):
        messages.append({"role": "system", "content": _text_field(fields, "system", where, "alpaca")})
    for k, turn in enumerate(fields.get("history") or []):  # LLaMA-Factory: earlier [instruction, response] pairs
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise UsageError(f'{where}: "history" item {k} must be a pair of strings [instruction, response].')
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = "\n\n".join(part for part in (instruction, extra) if part.strip())  # Dolly has rows with "" for either
    messages.append({"role": "user", "content": prompt})
    messages.append(_with_reasoning({"role": "assistant", "content": output}, fields, where))
    return Example(tuple(messages), None, where, tools=row_tools(fields, where),
                   skip=None if prompt else EMPTY_INSTRUCTION)


def _glaive(fields: dict[str, Any]) -> str | None:
    """The column of a glaive-function-calling transcript a chat row is read from (its ``system`` column is the
    transcript's own), or None."""
    column = transcript_column(fields)
    return column if not _listed(fields.get("conversation")) and not _exchanges(fields.get(EXCHANGES_COLUMN)) else None


def _chat(fields: dict[str, Any], where: str, names: FieldMap) -> Example:
    column = _glaive(fields)
    if column:
        messages, tools = transcript(fields, where) if fields[column].strip() else ([], [])  # glaive-function-calling
        return Example(tuple(_message(m, f"{where}, message {i}", FieldMap(), "glaive") for i, m in enumerate(messages)),
                       None, where, tools=tuple(tools) or None)
    key = "messages"
    if "messages" not in fields and _listed(fields.get("conversation")):
        key = "conversation"
    elif "messages" not in fields and _exchanges(fields.get(EXCHANGES_COLUMN)):
        key = EXCHANGES_COLUMN
    return _conversation(fields, key, where, names, "chat")


def _exchanges(value: Any) -> bool:
    """Whether a ``texts`` column is a conversation: a non-empty list of ``{"user", "assistant"}`` exchanges
    (the_cauldron's; other ``texts`` columns, such as lists of strings, are not guessed at)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "user" in m and "assistant" in m for m in value)


def _listed(value: Any) -> bool:
    """Whether a column holds a list (or, from CSV, a JSON list): a ``conversation`` column is a conversation
    only then."""
    return isinstance(value, list) or (isinstance(value, str) and value.strip().startswith("[")
                                       and _json_list(value) is not None)


def _sharegpt(fields: dict[str, Any], where: str, names: FieldMap) -> Example:
    return _conversation(fields, "conversations", where, names, "ShareGPT")


def _conversation(fields: dict[str, Any], key: str, where: str, names: FieldMap, fmt: str) -> Example:
    if key in fields and _no_entries(fields[key]):  # a conversation with no turns: nothing to train, skipped
        return Example((), None, where, skip=NO_MESSAGES)
    raw = _list_field(fields, key, where, fmt)
    if all(isinstance(m, str) for m in raw):  # LIMA's turns: plain strings, user first, then alternating
        raw = [{"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(raw)]
    elif all(_is_exchange(m, names) for m in raw):
        raw = [{"role": role, "content": m[k]} for m in raw
               for role, k in zip(("user", "assistant"), _exchange_keys(m))]
    messages = [_message(m, f"{where}, message {i}", names, fmt) for i, m in enumerate(raw)]
    system = _system_prompt(fields)  # LLaMA-Factory's system column: first, unless the conversation begins with its own
    if system is not None and not (messages and messages[0]["role"] in _SYSTEM_ROLES):
        messages.insert(0, {"role": "system", "content": system})
    return Example(tuple(messages), None, where, tools=row_tools(fields, where))


def _is_exchange(item: Any, names: FieldMap) -> bool:
    """An ``{"input", "output"}`` or ``{"user", "assistant"}`` entry without a role: a user turn and the
    assistant's reply."""
    return (isinstance(item, dict) and _exchange_keys(item) is not None
            and names.message_keys(item)[0] not in item)


def _exchange_keys(item: dict[str, Any]) -> tuple[str, str] | None:
    return next((keys for keys in _EXCHANGE_KEYS if all(k in item for k in keys)), None)


def _tool_call_turn(value: Any) -> list[dict[str, Any]] | None:
    """A completion that is a list of tool calls (or that list as JSON text, as xlam's ``answers``) as the assistant
    message making them, or None."""
    calls = tool_calls(value)
    return [{"role": "assistant", "content": None, "tool_calls": calls}] if calls else None


def _system_prompt(fields: dict[str, Any]) -> str | None:
    """The row's non-empty ``system`` column, or None."""
    system = fields.get("system")
    return system if isinstance(system, str) and system.strip() else None


def _prompt_completion(fields: dict[str, Any], where: str, names: FieldMap, chat: bool = False) -> Example:
    """A prompt-completion row; ``chat``: its source has a ``system`` column, so string prompts and completions
    are read as a user and an assistant message, and the system prompt leads the prompt."""
    if unpaired_label(fields) is not None:  # also with --format prompt-completion: never train label=false rows
        raise unpaired_error(where)
    prompt, completion = fields.get("prompt"), fields.get("completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None and not (key == "completion" and key in fields):  # a null completion: an empty answer
            raise UsageError(f'{where}: field "{key}" is missing (format prompt-completion).')
        listed = listed_messages(value, names, where, key)  # a CSV cell's messages (a JSON answer stays text)
        if listed is not None:
            fields = {**fields, key: listed}
    if _no_entries(fields["completion"]) and not message_reasoning(fields, where):
        return Example(None, "", where, prompt=prompt if isinstance(prompt, str) else "", skip=EMPTY_ANSWER)
    prompt, completion = fields["prompt"], _tool_call_turn(fields["completion"]) or fields["completion"]
    if isinstance(prompt, str) and isinstance(completion, str) and not chat:
        if THINK_CLOSE in completion and message_reasoning(fields, where):
            raise _twice_error(where, message_reasoning(fields, where)[0], '"completion"')
        return Example(None, completion, where, prompt=prompt, reasoning=message_reasoning(fields, where))
    turns = []
    for key, value, default_role in (("prompt", prompt, "user"), ("completion", completion, "assistant")):
        if isinstance(value, str):
            turns.append([{"role": default_role, "content": value}])
        elif isinstance(value, list) and value:
            turns.append([_message(m, f'{where}, "{key}" message {i}', names, "prompt-completion")
                          for i, m in enumerate(value)])
        else:
            raise UsageError(f'{where}: field "{key}" must be a string or a non-empty list of messages '
                             "(format prompt-completion).")
    prompt_m, completion_m = turns
    system = _system_prompt(fields)
    if system is not None and not any(m["role"] in _SYSTEM_ROLES for m in prompt_m):
        prompt_m.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in completion_m):
        raise UsageError(f'{where}: "completion" has no assistant message; it is what the model learns to write.')
    last = max(k for k, m in enumerate(completion_m) if m["role"] == "assistant")
    if not any(key in completion_m[last] for key in REASONING_KEYS):  # a reasoning column beside the completion
        completion_m[last] = _with_reasoning(completion_m[last], fields, where)
    return Example(tuple(prompt_m + completion_m), None, where, prompt_turns=len(prompt_m), tools=row_tools(fields, where))


def _text(fields: dict[str, Any], where: str, names: FieldMap) -> Example:
    value = fields.get("text")
    # a corpus's blank line (wikitext), or a null cell (a parquet gap): skipped when tokenized
    if "text" in fields and (value is None or isinstance(value, str) and not value.strip()):
        return Example(None, "", where)
    return Example(None, _text_field(fields, "text", where, "text"), where)


EMPTY_ANSWER = "an empty answer"
EMPTY_INSTRUCTION = "an empty instruction"
NO_MESSAGES = "no messages"


def _no_entries(value: Any) -> bool:
    """A null, blank or empty-list cell: a row with nothing there (CSV writes an empty list as ``[]``)."""
    if isinstance(value, str):
        return not value.strip() or value.strip() == "[]"
    return value is None or value == []


def _marked_empty(example: Example) -> Example:
    """``example`` with its ``skip`` reason when an answer it would train is empty (:func:`empty_answer`; a plain
    completion with nothing in it). Training it would teach the model to stop at once: such rows (real datasets
    such as alpaca-cleaned hold a few) are skipped and counted. A row whose only prompt is its images (an alpaca
    captioning row with no instruction) is not empty: the images are the instruction."""
    if example.skip == EMPTY_INSTRUCTION and example.images:
        example = replace(example, skip=None)
    if example.skip is not None:
        return example
    if example.messages is not None:
        if not example.messages:
            return replace(example, skip=NO_MESSAGES)
        trained = [m for m in example.messages[example.prompt_turns or 0:]
                   if m.get("role") == "assistant" and m.get("weight", 1) != 0]  # none: no trainable tokens, counted
        return replace(example, skip=EMPTY_ANSWER) if trained and empty_answer(trained) else example
    if example.prompt is not None and not (example.text or "").strip() and example.reasoning is None:
        return replace(example, skip=EMPTY_ANSWER)
    return example


def empty_answer(answer: str | Sequence[dict[str, Any]]) -> bool:
    """Whether an answer has nothing to train: a blank text, or messages with an assistant turn that has no text,
    tool call or reasoning (or with no assistant turn at all)."""
    if isinstance(answer, str):
        return not answer.strip()
    turns = [m for m in answer if m.get("role") == "assistant"]
    return not turns or any(not m.get("tool_calls") and not any(
        isinstance(m.get(key), str) and m[key].strip() for key in ("content", *REASONING_KEYS)) for m in turns)


def _pieces(fields: dict[str, Any], where: str, names: FieldMap) -> Example:
    if not is_written(fields.get("pieces")):
        raise UsageError(f"{where}: this row is not in the pieces shape of the other rows.")
    return Example(None, None, where, pieces=fields["pieces"])


_CONVERTERS = {"alpaca": _alpaca, "chat": _chat, "sharegpt": _sharegpt, "prompt-completion": _prompt_completion,
               "text": _text, "pieces": _pieces}


def _message(item: Any, where: str, names: FieldMap, fmt: str) -> dict[str, Any]:
    """One message in our shape; entries may use role/content or from/value (or the --data-fields names)."""
    if not isinstance(item, dict):
        raise UsageError(f"{where}: each message must be an object with a role and a content (format {fmt}), "
                         f"got {type(item).__name__}.")
    role_key, content_key = names.message_keys(item)
    speaker = item.get(role_key)
    if role_key in item and not isinstance(speaker, str):
        raise UsageError(f'{where}: "{role_key}" must be a string naming the speaker, got {speaker!r} (format {fmt}).')
    if not isinstance(speaker, str) or (content_key not in item and "tool_calls" not in item
                                        and "function_call" not in item
                                        and speaker_name(speaker) not in _TOOL_CALL_SPEAKERS):
        raise UsageError(f'{where}: each entry needs string fields "{role_key}" and "{content_key}" (format {fmt}); '
                         f"this one has {sorted(item)}. Map other names with --data-fields role=KEY,content=KEY.")
    role = names.role(speaker)
    if role is None:
        kind = "ShareGPT speaker" if fmt == "ShareGPT" else "role"
        known = ", ".join(sorted(set(ROLE_NAMES) | set(names.roles)))
        raise UsageError(f"{where}: unknown {kind} {speaker!r}; known: {known}. Map it with --data-fields, e.g. "
                         f"--data-fields assistant={speaker} (roles: {', '.join(ROLES)}).")
    message: dict[str, Any] = {"role": role}
    content = item.get(content_key)
    if speaker_name(speaker) in _TOOL_CALL_SPEAKERS and role == "assistant":  # glaive / LLaMA-Factory tool-call turn
        message["content"] = None
        message["tool_calls"] = _tool_calls(_parsed_json(content, where, "the function_call value"), where)
        return message
    # OpenAI's legacy function calling: one "function_call" {"name", "arguments"} where tool_calls is now
    calls = item.get("tool_calls") or item.get("function_call")
    if calls and role == "assistant":  # OpenAI exports write [] or null when a message calls nothing
        message["tool_calls"] = _tool_calls(_parsed_json(calls, where, '"tool_calls"'), where)
    message["content"] = _content(content, where, role, content_key, fmt, bool(message.get("tool_calls")))
    if role == "assistant":
        message = _with_reasoning(message, item, where)
    weight = item.get("weight")
    if weight is not None and role == "assistant":  # OpenAI fine-tuning data: weight 0 = context only
        if weight not in (0, 1):
            raise UsageError(f'{where}: "weight" must be 0 (not trained) or 1 (trained), got {weight!r}.')
        if weight == 0:
            message["weight"] = 0
    for key in ("tool_call_id", "name"):
        if isinstance(item.get(key), str):
            message[key] = item[key]
    return message


def _with_reasoning(message: dict[str, Any], source: dict[str, Any], where: str) -> dict[str, Any]:
    """``message`` (an assistant turn) with the reasoning field of ``source`` (the raw message, or the row whose
    column holds the answer's reasoning), under its own name."""
    found = message_reasoning(source, where)
    if found is None:
        return message
    content = message.get("content") or ""
    if THINK_CLOSE in content:
        reasoning, answer = split_think(content)
        if reasoning != found[1].strip():
            raise _twice_error(where, found[0], "its content")
        message = {**message, "content": answer}  # the same reasoning written twice: the field keeps it
    return {**message, found[0]: found[1]}


def _twice_error(where: str, key: str, holder: str) -> UsageError:
    return UsageError(f'{where}: the assistant answer has two different reasonings: in field "{key}" and as a '
                      f"<think>...</think> block in {holder}. Keep one of them (the field, with the answer alone in "
                      "the content, is what reasoning templates such as Qwen3 and gpt-oss take).")


def _content(content: Any, where: str, role: str, key: str, fmt: str,
             has_calls: bool) -> str | list[dict[str, Any]] | None:
    """A message's text: a string, text parts joined (OpenAI / HF multimodal style), a tool's JSON result, a number's
    decimal text (``{"from": "gpt", "value": 42}``: what a chat template renders of it, so TRL trains "42" too); with
    image parts, the parts (text ones normalized), for :func:`~qlora.chat.images.attach_images`."""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool) and role != "tool" and (
            content == content and abs(content) != float("inf")):  # NaN, inf: no answer, refused below
        return str(content)
    if content is None:
        if has_calls:
            return None  # an assistant turn that only calls tools: null, as OpenAI writes it and templates test
        if role == "assistant":  # a null answer (a ShareGPT dump's gap), or a reasoning without one: empty text
            return ""
        raise UsageError(f'{where}: the {role} message has no "{key}" (format {fmt}); only an assistant message '
                         'may have none.')
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for k, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
            if isinstance(part, dict) and kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif isinstance(part, str):
                parts.append({"type": "text", "text": part})
            elif isinstance(part, dict) and kind in IMAGE_PART_TYPES:
                parts.append(part)  # resolved with the row's images (qlora.chat.images)
            elif isinstance(part, dict) and kind == "text":
                found = "missing" if "text" not in part else "null" if part["text"] is None else (
                    f'a {type(part["text"]).__name__}')
                raise UsageError(f'{where}: content part {k} is a text part whose "text" is {found}; it must be a '
                                 "string. Write its text, or remove the part.")
            else:
                raise UsageError(f"{where}: content part {k} is of type {kind!r}; qlora trains on text and images, "
                                 'so only text parts ({"type": "text", "text": ...}) and image parts ({"type": '
                                 f'"image", "image": "path"}}) are accepted. Remove the {kind} parts or the row.')
        if any(p["type"] != "text" for p in parts):
            return parts
        return "\n".join(p["text"] for p in parts)
    if isinstance(content, (dict, int, float)) and not isinstance(content, bool) and role == "tool":
        return json.dumps(content, ensure_ascii=False)
    raise UsageError(f'{where}: "{key}" must be a string, a number or a list of text parts, got '
                     f"{json.dumps(content) if isinstance(content, (bool, float)) else type(content).__name__} "
                     f"(format {fmt}); write the text of the message there.")


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """Tool calls as Hugging Face chat templates expect them: ``{"type": "function", "function":
    {"name", "arguments": dict}}``; OpenAI's JSON-string arguments are parsed."""
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise UsageError(f"{where}: the tool call list is empty.")
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UsageError(f'{where}: tool call {k} needs a "name" (OpenAI style: {{"type": "function", '
                             '"function": {"name": ..., "arguments": {...}}}).')
        args = fn.get("arguments", fn.get("parameters"))
        if args is None:  # a call that takes none (a struct column holds a call without the field as null)
            args = {}
        if isinstance(args, str):
            args = _parsed_json(args, where, f"the arguments of tool call {k}") if args.strip() else {}
        if not isinstance(args, dict):
            raise UsageError(f"{where}: the arguments of tool call {k} must be a JSON object.")
        normalized: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            normalized["id"] = call["id"]
        out.append(normalized)
    return out


def row_tools(fields: dict[str, Any], where: str) -> tuple[dict[str, Any], ...] | None:
    """The row's ``tools`` column: a list of tool definitions, or that list as a JSON string; else the function
    definitions of its ``functions`` column (OpenAI's legacy function calling)."""
    value = fields.get("tools")
    if value is None or value == "" or value == []:
        return _legacy_functions(fields.get("functions"))
    if isinstance(value, str):
        value = _parsed_json(value, where, 'the "tools" field')
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UsageError(f'{where}: "tools" must be a list of tool definitions (JSON objects), or that list as a '
                         "JSON string.")
    return tuple(value) or None


def row_template_kwargs(fields: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The row's ``chat_template_kwargs`` column: variables its conversation is rendered with (SmolTalk2's
    ``{"enable_thinking": false}``), as TRL's trainers pass them to ``apply_chat_template``; a JSON object, or that
    object as a JSON string (CSV). Keys that are parameters of the rendering, not variables, are refused as
    ``--chat-template-kwargs`` refuses them (:mod:`qlora.template_kwargs`), and so are the generation prompt's
    options, which training sets (TRL fails on them)."""
    value = fields.get(TEMPLATE_KWARGS_COLUMN)
    if isinstance(value, str):  # a CSV cell; an empty one is no variables
        value = _parsed_json(value, where, f'the "{TEMPLATE_KWARGS_COLUMN}" field') if value.strip() else None
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise UsageError(f'{where}: "{TEMPLATE_KWARGS_COLUMN}" must be a JSON object of chat template variables '
                         f'(such as {{"enable_thinking": false}}), or that object as a JSON string; got '
                         f"{type(value).__name__} {repr(value)[:80]}.")
    key = render_parameter(value) or next((k for k in value if k in _PLACED_PROMPT), None)
    if key is not None:
        instead = {"tools": 'give them in the row\'s "tools" column', "chat_template": "give the template with "
                   "--template"}.get(key, "leave it out" if key not in _PLACED_PROMPT else
                                     "training places the generation prompt where each answer starts; leave it out")
        raise UsageError(f'{where}: "{TEMPLATE_KWARGS_COLUMN}" key {key!r} is a parameter of the rendering, not a '
                         f"template variable; {instead}.")
    return dict(value)


# apply_chat_template's prompt options, which serve takes among a request's variables (as vLLM) but training sets
_PLACED_PROMPT = ("add_generation_prompt", "continue_final_message")


def _legacy_functions(value: Any) -> tuple[dict[str, Any], ...] | None:
    """A ``functions`` column of bare function definitions (``{"name", "parameters"}``, as OpenAI's legacy
    fine-tuning data beside ``function_call`` turns) as tools; None for any other column of that name."""
    if isinstance(value, str):
        value = _json_list(value)
    if not (isinstance(value, list) and value and all(isinstance(f, dict) and isinstance(f.get("name"), str)
                                                      for f in value)):
        return None
    return tuple({"type": "function", "function": f} for f in value)


def _parsed_json(value: Any, where: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: {what} is not valid JSON ({e.msg} at column {e.colno}).") from None


def listed_messages(value: Any, names: FieldMap, where: str, key: str) -> list[dict[str, Any]] | None:
    """The messages of a text cell holding a message list as JSON (a CSV or TSV cell, a string column), or None:
    where its entries are not messages (no role key, or ``from``), the text is the answer itself, as a model taught
    to answer in JSON writes it (``[{"name": "Ann", "age": 3}]``, ``[{"role": "admin"}]``).

    Raises:
        UsageError: a message list written as Python text (:func:`_refuse_python_list`).
    """
    if not (isinstance(value, str) and value.lstrip().startswith("[")):
        return None
    _refuse_python_list(value, where, key)
    parsed = _json_list(value)
    return parsed if parsed and all(_message_like(m, names) for m in parsed) else None


def _message_like(item: dict[str, Any], names: FieldMap) -> bool:
    """Whether ``item`` has a message's speaker and what it says (its content, or the tools it calls)."""
    role, content = names.message_keys(item)
    return role in item and any(key in item for key in (content, "tool_calls", "function_call"))


# The start of a message list written as Python text: str() of a list of dicts, as pandas' and datasets' to_csv write
# a list column ("[{'role': 'user', ...}" with numpy's newlines between the entries, and no commas)
_PYTHON_MESSAGES = re.compile(r"\s*\[\s*\{\s*'(role|from|content|value)'\s*:")


def _refuse_python_list(value: str, where: str, key: str) -> None:
    """Refuse a cell holding messages as Python text: not JSON, so no reader gets the conversation back, and read as
    a text it would teach the model to write Python dicts."""
    if _PYTHON_MESSAGES.match(value) and value.rstrip().endswith("]"):  # the whole cell, not code that starts so
        raise UsageError(f'{where}: field "{key}" holds a message list written as Python text ({value.strip()[:30]!r}'
                         "...), as pandas' and datasets' to_csv write a list column; it is not JSON, so the messages "
                         'cannot be read back. Write the data as JSON Lines (Dataset.to_json("data.jsonl"), or '
                         'DataFrame.to_json("data.jsonl", orient="records", lines=True)), or each such cell with '
                         "json.dumps.")


def _json_list(value: str) -> list | None:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else None


def _cell_text(fields: dict[str, Any], key: str, where: str, fmt: str) -> str:
    """A text column that may be empty in some rows: null is ``""`` (a parquet or CSV gap), a number its
    decimal text (a numeric answer column), a list of one string that string (visual QA's answer lists, as
    HuggingFaceM4/ChartQA's ``label``); a missing column, a list of several answers or another type is
    refused."""
    if key not in fields:
        raise UsageError(f'{where}: field "{key}" is missing (format {fmt}).')
    value = fields[key]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > 1:  # DocVQA's spellings of one answer, VQA's annotators': which to train is the user's call
            raise UsageError(f'{where}: field "{key}" holds {len(value)} texts ({", ".join(map(repr, value[:3]))}'
                             f'{", ..." if len(value) > 3 else ""}); a row trains one. Write the one to train (say '
                             f'the first) into a column of its own and map it with --data-fields {key}=COLUMN, or '
                             f'map a column holding one answer (format {fmt}).')
        value = value[0]
    if value is None or (isinstance(value, float) and value != value):  # null, or NaN as pandas writes a gap
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UsageError(f'{where}: field "{key}" must be a string, got {type(value).__name__} (format {fmt}).')
    return value


def _text_field(fields: dict[str, Any], key: str, where: str, fmt: str) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or (key != "system" and not value.strip()):
        problem = "is missing" if value is None else "must be a non-empty string"
        raise UsageError(f'{where}: field "{key}" {problem} (format {fmt}).')
    return value


def _list_field(fields: dict[str, Any], key: str, where: str, fmt: str) -> list[Any]:
    value = fields.get(key)
    if isinstance(value, str) and value.strip().startswith("["):  # a message list stored as JSON text (CSV)
        _refuse_python_list(value, where, key)
        value = _json_list(value) or value
    if not isinstance(value, list) or not value:
        problem = "is missing" if value is None else "must be a non-empty list"
        raise UsageError(f'{where}: field "{key}" {problem} (format {fmt}).')
    return value
