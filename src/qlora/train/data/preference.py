"""Preference pairs for DPO and ORPO: normalize, tokenize and batch.

A row holds a prompt and two answers to it, ``chosen`` (preferred) and
``rejected``, in one of the shapes users bring (TRL's and LLaMA-Factory's):

- plain strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``;
- conversations: ``prompt`` a list of ``{"role", "content"}`` messages and
  ``chosen`` / ``rejected`` the assistant message(s) that follow it (a string
  prompt is one user message, a string answer one assistant message);
- implicit prompt: ``chosen`` and ``rejected`` whole conversations, or whole texts
  (Anthropic HH); their shared leading messages (or characters) are the prompt (a
  ``prompt`` string beside conversations, as in UltraFeedback, repeats the last user
  message and is not used).

A ``system`` column (Intel/orca_dpo_pairs, jondurbin/truthy-dpo) is the system message of the
pair's prompt: a source that has one (non-empty in any row) is read as conversations, its string
prompts and answers as user and assistant messages, since plain text has no place for a system
prompt (TRL's DPOTrainer leaves the column unused). Columns named otherwise are mapped with
``--data-fields`` (``prompt=question``), message keys and roles too, as for SFT.

A row with images (an ``images`` column with image parts in the prompt, as TRL's vision preference data; one
``image`` a row beside a string prompt, as openbmb/RLAIF-V-Dataset) is a conversation whose prompt holds them,
placed as SFT places a row's (:mod:`qlora.chat.images`); its prompt goes through the model's processor once
and both answers' rows get its image tensors.

Assistant messages may carry reasoning (``reasoning_content``/``reasoning``/``thinking``, or a
``<think>`` block in the content): it is placed and kept as for SFT, so each answer's reasoning
is part of what DPO compares.

A pair another tool's reader wrote as pieces (torchtune's preference datasets) holds two whole conversations,
each tokenized as that tool does; its prompt is their shared start and each answer keeps the tool's label mask.

Tokens follow the SFT rules of :func:`qlora.train.data.tokenize_example`
(conversations rendered with the run's chat format, which decides BOS and end
markers, an EOS only after an answer nothing else ends; plain text with the
tokenizer's own BOS setting),
so a DPO run continues an SFT run on the same token conventions. The prompt is
tokenized once per pair; each answer starts where ``prompt + answer`` stops
agreeing with the prompt alone (usually right after it; earlier when a BPE
merge crosses the boundary), as TRL does. Sequences longer than ``--seq-len``
keep their start; a pair left with no answer token is skipped and reported, and so is a pair whose two
answers are the same (datasets hold a few such ties; TRL trains them, on a DPO loss with no gradient), or
one of whose answers is empty or null (as SFT rows with an empty answer are).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch

from qlora.chat.common_ends import common_prefix
from qlora.chat.example import Example, render_kwargs
from qlora.chat.image_examples import expanded_prompt, image_batch
from qlora.chat.images import ImageRef, as_parts, attach_images, has_image_parts, images_in, refuse_media
from qlora.chat.pieces import is_written, piece_ids
from qlora.chat.tokenize import IGNORE_INDEX, for_template, rendering_kwargs, require_eos, tokenize_example
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.model.image_processor import image_token_id
from qlora.train.data.fields import (FieldMap, message_like, pair_hint, parse_data_fields, prompt_column,
                                     unsupported_rows)
from qlora.train.data.formats import (EMPTY_ANSWER, empty_answer, listed_messages, normalize, row_template_kwargs,
                                     row_tools, unpaired_error, unpaired_label)
from qlora.train.data.sources import Record
from qlora.train.data.tokenized_dataset import PROMPT_FILLS_SEQ_LEN, DataReport, first_places

FIELDS = ("prompt", "chosen", "rejected")
Messages = tuple[dict[str, str], ...]


@dataclass(frozen=True)
class PreferenceExample:
    """One pair: all three parts strings, or all three message tuples."""

    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages
    where: str
    skip: str | None = None  # why the pair is skipped when tokenized ("an empty answer")
    images: tuple[ImageRef, ...] = ()  # the prompt's, in the order its image parts place them
    pieces: bool = False  # chosen and rejected are whole conversations written as pieces (torchtune's), no prompt
    tools: tuple[dict[str, Any], ...] | None = None  # a conversational row's tool definitions, for its template
    template_kwargs: dict[str, Any] | None = None  # a conversational row's chat_template_kwargs

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: the shared prompt once, then each answer's own tokens.

    ``ref_logps`` holds the reference log-probs (chosen, rejected) once
    precomputed (``--precompute-ref``).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int
    truncated: bool = False
    ref_logps: tuple[float, float] | None = None
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # the prompt's image tensors, for both rows
    image_tokens: tuple[tuple[int, int], ...] = ()  # spans of prompt_ids standing for the images
    trained: tuple[tuple[bool, ...], tuple[bool, ...]] | None = None  # chosen's, rejected's labels (None: all)


def message_tuple(value: Any, where: str, key: str, names: FieldMap = FieldMap()) -> Messages:
    """Validate a message list with the chat format's own checks (``names``: --data-fields' message keys and
    role values; its columns were renamed already)."""
    example = normalize([Record({"messages": value}, f'{where}, field "{key}"')], "chat",
                        replace(names, columns={}), images=False)[0]  # placed in the prompt (with_images)
    if not example.messages:
        raise UsageError(f'{where}: field "{key}" must be a non-empty message list.')
    return example.messages


def renamed_source(records: list[Record], fields: FieldMap | str | dict | None) -> tuple[list[Record], FieldMap, bool]:
    """One source's rows under our column names (``fields``: ``--data-fields``), the parsed map (for the keys and
    roles inside messages), and whether the source is read as conversations (:func:`read_as_chat`)."""
    names = parse_data_fields(fields)
    records = [_listed_cells(names.rename(r), names) for r in records]
    return records, names, read_as_chat(records)


def _listed_cells(record: Record, names: FieldMap) -> Record:
    """``record`` with its prompt and answers that are message lists written as JSON text (CSV and TSV cells) read
    as those lists, as SFT reads a prompt-completion row's (:func:`~qlora.train.data.formats.listed_messages`)."""
    listed = {key: listed_messages(record.fields.get(key), names, record.where, key)
              for key in ("prompt", "chosen", "rejected", "completion")}
    listed = {key: value for key, value in listed.items() if value is not None}
    return replace(record, fields={**record.fields, **listed}) if listed else record


def read_as_chat(records: list[Record]) -> bool:
    """Whether a source's rows are read as conversations: some row has a system prompt (:func:`system_turn`)."""
    return any(system_turn(r.fields, r.where) for r in records)


def system_turn(fields: dict[str, Any], where: str) -> Messages:
    """The row's ``system`` column as a message (none when absent or empty)."""
    system = fields.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return ()
    if not isinstance(system, str):
        raise UsageError(f'{where}: field "system" must be a string (the system prompt), got {type(system).__name__}.')
    return ({"role": "system", "content": system},)


def with_system(prompt: Messages, fields: dict[str, Any], where: str) -> Messages:
    """``prompt`` led by the row's system message, unless it holds one itself."""
    if any(m["role"] == "system" for m in prompt):
        return prompt
    return system_turn(fields, where) + tuple(prompt)


def missing_prompt_hint(fields: dict[str, Any]) -> str:
    """A sentence suggesting --data-fields for a row whose prompt is under another name ('' if none is)."""
    column = prompt_column({k: v for k, v in fields.items() if k != "prompt"})
    if column:
        return f" If {column!r} is the prompt, map it with --data-fields prompt={column}."
    listed = next((k for k, v in fields.items() if k not in ("chosen", "rejected") and message_like(v)), None)
    return (f" If {listed!r} holds the conversation before the answers, map it with --data-fields prompt={listed}."
            if listed else "")


def normalize_preferences(records: list[Record], fields: FieldMap | str | dict | None = None,
                          dataset_dir: str | None = None) -> list[PreferenceExample]:
    """Preference rows of one source to :class:`PreferenceExample` (see the module docstring for the shapes).

    ``fields``: ``--data-fields``, the dataset's names for our columns, message keys and roles;
    ``dataset_dir``: where image paths not found beside the data file are looked for.

    Raises:
        UsageError: naming the file and line of a row with a missing or
            malformed field.
    """
    if not records:
        raise UsageError("the preference dataset is empty; it needs at least one row.")
    records, names, chat = renamed_source(records, fields)
    return [pair_from_row(r.fields, r.where, names, chat, r.image_folders(dataset_dir))
            for r in records]


def pair_from_row(fields: dict[str, Any], where: str, names: FieldMap, chat: bool,
                  folders: Sequence[str] = ()) -> PreferenceExample:
    """One renamed row as a pair; ``chat``: its source is read as conversations (:func:`read_as_chat`). A pair with
    an empty (or null) answer is marked to be skipped, as SFT rows with an empty answer are. A row with images is
    a conversation whose prompt holds them (:func:`with_images`); ``folders``: where their relative paths start.

    Raises:
        UsageError: a malformed row, images outside the prompt's user turns or not readable, videos or audios.
    """
    refuse_media(fields, where)
    if all(is_written(fields.get(key)) for key in ("chosen", "rejected")):
        return PreferenceExample("", fields["chosen"], fields["rejected"], where, pieces=True)
    if images_in(fields):
        pair = with_images(_answered_pair(fields, where, names, True), fields, where, folders)
    else:
        pair = _answered_pair(fields, where, names, chat)
    # "tools" and "chat_template_kwargs" columns are rendered with a conversation, as TRL's DPOTrainer and
    # KTOTrainer render them
    variables = row_template_kwargs(fields, where)
    return replace(pair, tools=row_tools(fields, where), template_kwargs=variables) if pair.conversational else pair


def _answered_pair(fields: dict[str, Any], where: str, names: FieldMap, chat: bool) -> PreferenceExample:
    # a null (parquet) or empty-list answer is an empty one: the pair keeps its prompt, so KTO, which reads each
    # half as an example, still trains the half that has an answer
    fields = {**fields, **{key: "" for key in ("chosen", "rejected")
                           if key in fields and (fields[key] is None or fields[key] == [])}}
    if all(isinstance(fields.get(key), str) for key in ("chosen", "rejected")) and not isinstance(
            fields.get("prompt"), (str, list)) and any(not fields[key].strip() for key in ("chosen", "rejected")):
        return PreferenceExample("", fields["chosen"], fields["rejected"], where, skip=EMPTY_ANSWER)  # no prompt to cut
    pair = _pair_from_row(fields, where, names, chat)
    if empty_answer(pair.chosen) or empty_answer(pair.rejected):
        return replace(pair, skip=EMPTY_ANSWER)
    return pair


def with_images(pair: PreferenceExample, fields: dict[str, Any], where: str,
                folders: Sequence[str]) -> PreferenceExample:
    """``pair`` (read as a conversation) with the row's images placed in its prompt as SFT places a row's
    (:func:`~qlora.chat.images.attach_images`: image parts, ``<image>`` placeholders, else before the first
    user text) and each image resolved and checked; both answers see them (TRL's vision DPO, RLAIF-V).

    Raises:
        UsageError: an image in an answer, or as :func:`~qlora.chat.images.attach_images`.
    """
    if pair.skip:
        refuse_answer_images({"chosen": pair.chosen, "rejected": pair.rejected}, where)
        return pair
    prompt, images = prompt_with_images(pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}, fields,
                                        where, folders)
    return replace(pair, prompt=prompt, images=images)


def prompt_with_images(prompt: Messages, answers: dict[str, Any], fields: dict[str, Any], where: str,
                       folders: Sequence[str]) -> tuple[Messages, tuple[ImageRef, ...]]:
    """A conversational ``prompt`` with the row's images placed in it, and the images (resolved and checked);
    ``answers`` (by column name) must hold none: they are text about the prompt's images (DPO's, KTO's).

    Raises:
        UsageError: an image in an answer, or as :func:`~qlora.chat.images.attach_images`.
    """
    refuse_answer_images(answers, where)
    placed = attach_images(Example(tuple(prompt), None, where), fields, folders)
    return placed.messages, placed.images


def refuse_answer_images(answers: dict[str, Any], where: str) -> None:
    """Stop at an answer (by column name) holding image parts: the images belong to the prompt."""
    for key, answer in answers.items():
        if not isinstance(answer, str) and has_image_parts(answer):
            raise UsageError(f'{where}: "{key}" holds images; the answers are text about the images of the prompt. '
                             "Move the images to the prompt's user turn.")


def _pair_from_row(fields: dict[str, Any], where: str, names: FieldMap, chat: bool) -> PreferenceExample:
    need = '(preference rows need "prompt", "chosen" and "rejected": strings or message lists)'
    if "chosen" not in fields and unpaired_label(fields) is not None:
        raise unpaired_error(where)
    unsupported = unsupported_rows(fields, where)
    if unsupported:
        raise unsupported
    for key in ("chosen", "rejected"):
        value = fields.get(key)
        if value is None:
            hint = pair_hint(fields) or (
                " Map answers stored under other names with --data-fields chosen=COLUMN,rejected=COLUMN; answers "
                "that are only scored (a rating or preference strength per answer) need \"chosen\" and "
                "\"rejected\" columns written from those scores first.")
            raise UsageError(f'{where}: field "{key}" is missing {need}; the fields are {sorted(fields)}.{hint}')
        if not isinstance(value, (str, list)):
            raise UsageError(f'{where}: field "{key}" must be a string or a message list {need}.')
    prompt = fields.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise UsageError(f'{where}: field "prompt" must be a string or a message list {need}.')
    chosen, rejected = fields["chosen"], fields["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is None and chat:
            raise UsageError(f'{where}: field "prompt" is missing; this row is a conversation (its dataset has a '
                             '"system" column, or the row has images), and whole-text answers without a prompt '
                             f"cannot take a system message or images.{missing_prompt_hint(fields)}")
        if prompt is None:
            return _implicit_text_prompt(chosen, rejected, where, need, missing_prompt_hint(fields))
        if not chat:
            return PreferenceExample(prompt, chosen, rejected, where)
    answers = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        answers.append(message_tuple(value, where, key, names) if isinstance(value, list)
                       else ({"role": "assistant", "content": value},))
    chosen_m, rejected_m = answers
    shared = common_prefix(chosen_m, rejected_m)
    if not isinstance(prompt, list) and chosen_m[0]["role"] != "assistant":  # implicit prompt
        if chosen_m == rejected_m and len(chosen_m) > 1:  # a tie, skipped when tokenized; cut as TRL cuts it
            return PreferenceExample(with_system(chosen_m[:-1], fields, where), chosen_m[-1:], rejected_m[-1:], where)
        if shared == 0 or shared == len(chosen_m) or shared == len(rejected_m):
            raise UsageError(f'{where}: "chosen" and "rejected" are whole conversations, so their shared leading '
                             "messages are the prompt; they must share at least one message and then differ.")
        return PreferenceExample(with_system(chosen_m[:shared], fields, where), chosen_m[shared:],
                                 rejected_m[shared:], where)
    if prompt is None:
        raise UsageError(f'{where}: field "prompt" is missing {need}.{missing_prompt_hint(fields)}')
    if isinstance(prompt, list):
        prompt_m = message_tuple(prompt, where, "prompt", names)
    else:
        prompt_m = ({"role": "user", "content": prompt},)
    return PreferenceExample(with_system(prompt_m, fields, where), chosen_m, rejected_m, where)


def _implicit_text_prompt(chosen: str, rejected: str, where: str, need: str, hint: str) -> PreferenceExample:
    """Whole texts without a prompt (Anthropic HH's ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``): their
    shared start is the prompt, as TRL's ``extract_prompt`` cuts it (a space before the first
    differing character goes with the answers), unless the row has a column that looks like the prompt
    (``hint``, from :func:`missing_prompt_hint`)."""
    if hint:  # the shared start of two answers ("Step 1:") must not stand in for a prompt the row holds elsewhere
        raise UsageError(f'{where}: field "prompt" is missing {need}. Without it "chosen" and "rejected" are whole '
                         "texts whose shared start is the prompt (as in Anthropic HH), but this row has another "
                         f"column for the prompt.{hint}")
    if chosen == rejected:  # a tie (Anthropic HH has some), skipped when tokenized
        return PreferenceExample("", chosen, rejected, where)
    shared = common_prefix(chosen, rejected)
    if shared and shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0 or shared in (len(chosen), len(rejected)):
        raise UsageError(f'{where}: field "prompt" is missing {need}; "chosen" and "rejected" would then be whole '
                         "texts whose shared start is the prompt, but they "
                         f"{'share no start' if shared == 0 else 'do not differ after their shared start'}.{hint}")
    return PreferenceExample(chosen[:shared], chosen[shared:], rejected[shared:], where)


def prompt_ids(example: PreferenceExample, tokenizer, fmt: ChatFormat, answers: Sequence = ()) -> list[int]:
    """The prompt's ids: as the chat format renders it for generation (it decides BOS), in the template mode its
    ``answers`` are rendered in (:func:`~qlora.chat.tokenize.rendering_kwargs`: thinking mode for an answer whose
    reasoning only that mode shows), or plain text with the tokenizer's own BOS setting (as :func:`tokenize_example`
    reads text). ``example``: anything with ``prompt``, ``where`` and ``conversational`` (KTO's examples too).

    Raises:
        UsageError: the answers are rendered in different modes, so they follow no common prompt.
    """
    if not example.conversational:
        return list(tokenizer(example.prompt)["input_ids"])
    modes = [rendering_kwargs(_whole(example, a), tokenizer, fmt) for a in answers]
    if any(mode != modes[0] for mode in modes):
        switch = "/".join(sorted(set(modes[0]) ^ set(modes[-1])))
        raise UsageError(f"{example.where}: one answer has reasoning that the chat template ({fmt.origin}) shows only "
                         f"in its thinking mode ({switch} on) and another has none, so the answers follow different "
                         "prompts and cannot be compared on one: give every answer of the row its reasoning, or none.")
    prompt = for_template(example.prompt, fmt.template, tokenizer, example.where, fmt.origin)
    return list(fmt.render(tokenizer, prompt, example.where, add_generation_prompt=True,
                           tokenize=True, return_dict=True, **(modes[0] if modes else render_kwargs(example)))["input_ids"])


def full_ids(example: PreferenceExample, answer, tokenizer, fmt: ChatFormat,
              stop_ids: Iterable[int] | None) -> list[int]:
    if example.conversational:
        whole = _whole(example, answer)
    else:
        whole = Example(None, example.prompt + answer, example.where)
    return tokenize_example(whole, tokenizer, fmt, "all", stop_ids=stop_ids).input_ids


def _whole(example: PreferenceExample, answer) -> Example:
    """A conversational prompt and one of its answers as one conversation, rendered as the row is."""
    return Example(tuple(example.prompt) + tuple(answer), None, example.where, tools=example.tools,
                   template_kwargs=example.template_kwargs)


def prompt_example(example: PreferenceExample) -> Example:
    """A row's prompt alone, with its images, tools and template kwargs, as :func:`expanded_prompt` expands an SFT
    prompt's image tokens (``example``: KTO's examples too)."""
    return Example(example.prompt, None, example.where, images=example.images, tools=example.tools,
                   template_kwargs=example.template_kwargs)


def tokenize_pair(example: PreferenceExample, tokenizer, chat_template: str | ChatFormat, seq_len: int | None = None,
                  index: int = 0, stop_ids: Iterable[int] | None = None, processor=None) -> TokenizedPair | str:
    """Token ids of one pair; ``prompt + answer`` is cut to ``seq_len`` tokens (its start kept).

    ``stop_ids`` are the end-of-turn ids (as for :func:`tokenize_example`): an EOS follows an answer only
    when none of them ends it. A pair with images goes through ``processor`` (the model's): its prompt once,
    placeholders expanded (:func:`~qlora.chat.image_examples.expanded_prompt`), the answers as text; it is
    :data:`~qlora.chat.image_examples.IMAGES_TOO_LONG` when its image tokens do not fit ``seq_len``.

    Raises:
        UsageError: an answer holding the processor's image token, or as ``expanded_prompt``.
    """
    if example.pieces:
        return _written_pair(example, tokenizer, seq_len, index)
    fmt = chat_template if isinstance(chat_template, ChatFormat) else ChatFormat(chat_template)
    if example.images:  # vision-language chat templates read each content as parts (as_parts), as for SFT
        example = replace(example, **{k: tuple(as_parts(getattr(example, k))) for k in FIELDS})
    prompt = prompt_ids(example, tokenizer, fmt, (example.chosen, example.rejected))
    chosen = full_ids(example, example.chosen, tokenizer, fmt, stop_ids)
    rejected = full_ids(example, example.rejected, tokenizer, fmt, stop_ids)
    n = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    media, spans = {}, ()
    if example.images:
        expanded = expanded_prompt(prompt_example(example), n, processor, fmt, seq_len)
        if isinstance(expanded, str):
            return expanded
        prompt, media, spans = expanded
        refuse_image_tokens(chosen + rejected, processor, example.where)
    prompt, chosen, rejected, truncated = _cut(prompt, chosen, rejected, seq_len)
    return TokenizedPair(prompt, chosen, rejected, index, truncated, media=media, image_tokens=spans)


def _cut(prompt: list, chosen: list, rejected: list, seq_len: int | None) -> tuple[list, list, list, bool]:
    """``prompt + answer`` cut to ``seq_len`` (its start kept), and whether anything was cut."""
    if seq_len is None:
        return prompt, chosen, rejected, False
    room = max(0, seq_len - len(prompt))
    truncated = len(prompt) > seq_len or len(chosen) > room or len(rejected) > room
    return prompt[:seq_len], chosen[:room], rejected[:room], truncated


def _written_pair(example: PreferenceExample, tokenizer, seq_len: int | None, index: int) -> TokenizedPair:
    """A pair of conversations written as pieces, each tokenized whole as torchtune's PreferenceDataset does; the
    prompt is their shared start and each answer keeps the trained flags of its tokens. Trained tokens of the
    shared start (``train_on_input``) are left out: they add the same log-prob to both answers, so DPO's margins,
    and its loss, are the same without them."""
    (chosen, chosen_mask, chosen_cut), (rejected, rejected_mask, rejected_cut) = (
        piece_ids(p, tokenizer, example.where) for p in (example.chosen, example.rejected))
    n = common_prefix(chosen, rejected)
    prompt, chosen, rejected, truncated = _cut(chosen[:n], chosen[n:], rejected[n:], seq_len)
    truncated = truncated or chosen_cut or rejected_cut
    trained = (tuple(chosen_mask[n:n + len(chosen)]), tuple(rejected_mask[n:n + len(rejected)]))
    return TokenizedPair(prompt, chosen, rejected, index, truncated, trained=trained)


def refuse_image_tokens(ids: list[int], processor, where: str) -> None:
    """An answer must not hold the token the model replaces by image features: it would have no image."""
    token = image_token_id(processor)
    if token is not None and token in ids:
        raise UsageError(f"{where}: an answer holds the model's image token "
                         f"({processor.tokenizer.convert_ids_to_tokens(token)!r}), which stands for an image the "
                         "answers do not have. Remove image markers (such as <image>) from the answers.")


def tokenize_pairs(examples: list[PreferenceExample], tokenizer, chat_template: str | ChatFormat,
                   seq_len: int | None = None, stop_ids: Iterable[int] | None = None,
                   processor=None) -> tuple[list[TokenizedPair], DataReport]:
    """Tokenize every pair (those with images through ``processor``); skip and report (in the run's data line)
    those whose answers were truncated away (:data:`PROMPT_FILLS_SEQ_LEN`), or whose images do not fit ``seq_len``.

    Raises:
        UsageError: no pair is left, each skipped for the reasons it names.
    """
    require_eos(tokenizer)
    kept, report = [], DataReport(examples=len(examples))
    for i, example in enumerate(examples):
        if example.skip:
            report.skip(example.skip, example.where)
            continue
        if example.chosen == example.rejected:  # no preference to learn
            report.identical.append(example.where)
            continue
        pair = tokenize_pair(example, tokenizer, chat_template, seq_len, index=i, stop_ids=stop_ids,
                             processor=processor)
        if isinstance(pair, str):
            report.skip(pair, example.where)
            continue
        report.truncated += pair.truncated
        if not pair.chosen_ids or not pair.rejected_ids:
            report.skip(PROMPT_FILLS_SEQ_LEN, example.where)
        else:
            kept.append(pair)
    if not kept and len(report.identical) == len(examples):
        raise UsageError(f"all {len(examples)} preference pairs have the same chosen and rejected answer (first: "
                         f"{first_places(report.identical)}): there is no preference to learn.")
    if not kept:
        raise report.nothing_to_train(len(examples), "preference pairs")
    return kept, report


def preference_collate(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, right-padded: one forward pass for both answers.

    Returns ``input_ids`` and ``attention_mask`` ``[2B, T]``, ``labels`` (the
    answer tokens; -100 on prompt and padding), when every pair has them,
    ``ref_logps`` ``[2B]`` (float64) in the same row order, and with images each
    pair's image tensors for both its rows
    (:func:`~qlora.chat.image_examples.image_batch`) and ``image_tokens``
    ``[2B, T]``, true on the tokens the processor put in for them.
    """
    rows = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, start:len(row)] = torch.tensor(row[start:])
        attention_mask[i, :len(row)] = 1
    for i, p in enumerate(pairs):  # answers written with untrained tokens (torchtune's masks)
        for row, flags in ((i, p.trained[0]), (i + len(pairs), p.trained[1])) if p.trained else ():
            untrained = [prompt_lens[row] + k for k, flag in enumerate(flags) if not flag]
            labels[row, untrained] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all(p.ref_logps is not None for p in pairs):
        batch["ref_logps"] = torch.tensor([p.ref_logps[0] for p in pairs] + [p.ref_logps[1] for p in pairs],
                                          dtype=torch.float64)
    if any(p.media for p in pairs):
        batch |= image_batch(list(pairs) * 2, length)
        image_tokens = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, p in enumerate(list(pairs) * 2):
            for start, end in p.image_tokens:
                image_tokens[i, start:end] = True
        batch["image_tokens"] = image_tokens
    return batch
