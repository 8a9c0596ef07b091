"""Unpaired preference data for KTO: normalize, tokenize and batch.

A row holds a prompt, one completion and a true/false (or 1/0) ``label`` (desirable or
not), TRL's "unpaired preference" type: ``prompt`` and ``completion`` both
strings, or message lists (a string prompt is one user message, a string
completion one assistant message). Preference pairs are unpaired as TRL's
``unpair_preference_dataset`` does: a pair gives its chosen answer labelled true
and its rejected one labelled false.

Tokens follow the rules of preference pairs (:mod:`qlora.train.data.preference`,
which follow SFT's): the completion starts where ``prompt + completion`` stops
agreeing with the prompt alone, as TRL's KTOTrainer cuts it. A row with images is
read as a preference pair with images is (a conversation whose prompt holds them:
an ``images`` column or one ``image`` a row; both halves of a pair keep its images),
and its prompt goes through the model's processor once.

KTO's KL term compares the policy and the reference on mismatched pairs: each
micro-batch of ``B`` examples also carries ``B`` rows that pair each prompt with
the previous example's completion (``(x_1, y_B), (x_2, y_1), ..., (x_B, y_B-1)``),
the rotation TRL applies within each batch. Under several ranks the rotation runs
over the global micro-batch (``B x ranks`` examples, each rank's share taking its
first completion from the previous rank's share), so that the pairs are those of
one process with the global batch (TRL rotates within each device's batch instead).
A KL row's images are its prompt's: the images travel with the prompts, not the
completions. With ``--precompute-ref`` the reference log-probs of the KL rows are computed
once, so each prompt's partner is fixed before training (:func:`fixed_kl_pairs`, as TRL fixes
it when it prepares the dataset) and stays the same in every epoch, however they are shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch

from qlora.chat.common_ends import common_prefix
from qlora.chat.image_examples import expanded_prompt, image_batch, token_aligned
from qlora.chat.images import ImageRef, as_parts, images_in, refuse_media
from qlora.chat.tokenize import IGNORE_INDEX, require_eos
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data.fields import FieldMap, pair_hint, unsupported_rows
from qlora.train.data.formats import EMPTY_ANSWER, empty_answer, row_template_kwargs, row_tools, unpaired_label
from qlora.train.data.preference import (Messages, PreferenceExample, full_ids, message_tuple, missing_prompt_hint,
                                         pair_from_row, prompt_example, prompt_ids, prompt_with_images,
                                         refuse_answer_images, refuse_image_tokens, renamed_source, with_system)
from qlora.train.data.sources import Record
from qlora.train.data.tokenized_dataset import PROMPT_FILLS_SEQ_LEN, DataReport, first_places

_ROW_KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class UnpairedExample:
    """One completion and whether it is desirable: prompt and completion both strings, or both message tuples."""

    prompt: str | Messages
    completion: str | Messages
    desirable: bool
    where: str
    tie: bool = False  # unpaired from a pair whose two answers are the same: skipped when tokenized
    skip: str | None = None  # why it is skipped when tokenized ("an empty answer")
    images: tuple[ImageRef, ...] = ()  # the prompt's, in the order its image parts place them
    tools: tuple[dict[str, Any], ...] | None = None  # a conversational row's tool definitions, for its template
    template_kwargs: dict[str, Any] | None = None  # a conversational row's chat_template_kwargs

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class TokenizedUnpaired:
    """Token ids of one example: its prompt, then its completion's own tokens (cut to fit after the prompt), and
    the completion as another prompt's KL row takes it: cut only to ``seq_len`` alone, since a KL row is cut as a
    whole (TRL cuts the rows, not the completions, so a completion cut short after its own long prompt is longer
    after a shorter one)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool
    index: int
    kl_completion_ids: list[int]
    truncated: bool = False
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # the prompt's image tensors
    kl_pair_ids: list[int] | None = None  # the other completion of its KL row, when fixed (:func:`fixed_kl_pairs`)
    ref_logps: tuple[float, ...] | None = None  # precomputed reference log-probs: completion (and KL row)


def normalize_unpaired(records: list[Record], fields: FieldMap | str | dict | None = None,
                       dataset_dir: str | None = None) -> list[UnpairedExample]:
    """Unpaired rows (and preference pairs, unpaired) of one source to :class:`UnpairedExample`; ``fields``,
    a ``system`` column, message lists and images are read as for preference pairs (:mod:`.preference`);
    ``dataset_dir``: where image paths not found beside the data file are looked for.

    Raises:
        UsageError: naming the file and line of a row with a missing or malformed field.
    """
    if not records:
        raise UsageError("the KTO dataset is empty; it needs at least one row.")
    records, names, chat = renamed_source(records, fields)
    out: list[UnpairedExample] = []
    for r in records:
        refuse_media(r.fields, r.where)
        folders = r.image_folders(dataset_dir)
        if "chosen" in r.fields and "rejected" in r.fields:
            pair: PreferenceExample = pair_from_row(r.fields, r.where, names, chat, folders)
            if pair.pieces:
                raise UsageError(f"{r.where}: this pair is two whole conversations as torchtune's tokenizer writes "
                                 "them (its preference datasets), with no prompt apart from the answers that --method "
                                 "kto could pair each answer with. Train it with --method dpo, or give --template to "
                                 "write the rows with the model's chat template.")
            tie = pair.chosen == pair.rejected and not pair.skip  # the same answer labelled desirable and not
            out += [UnpairedExample(pair.prompt, answer, desirable, r.where, tie,  # a half with an answer stays
                                    pair.skip if pair.skip and (not pair.prompt or empty_answer(answer)) else None,
                                    pair.images, pair.tools, pair.template_kwargs)
                    for answer, desirable in ((pair.chosen, True), (pair.rejected, False))]
        elif images_in(r.fields):  # a conversation whose prompt holds the images
            example = _normalize_row(r.fields, r.where, names, True)
            if example.skip:
                refuse_answer_images({"completion": example.completion}, r.where)
                out.append(example)
                continue
            prompt, images = prompt_with_images(example.prompt, {"completion": example.completion}, r.fields,
                                                r.where, folders)
            out.append(replace(example, prompt=prompt, images=images))
        else:
            out.append(_normalize_row(r.fields, r.where, names, chat))
    return out


def _normalize_row(fields: dict, where: str, names: FieldMap, chat: bool) -> UnpairedExample:
    need = ('(KTO rows need "prompt", "completion" (strings or message lists) and "label" (true: a desirable '
            'completion, false: an undesirable one), or preference pairs "prompt", "chosen", "rejected")')
    completion, label = fields.get("completion"), unpaired_label(fields)
    if "completion" in fields and label is not None and (
            completion is None or completion == [] or (isinstance(completion, str) and not completion.strip())):
        return UnpairedExample("", "", label, where, skip=EMPTY_ANSWER)
    unsupported = unsupported_rows(fields, where)
    if unsupported:
        raise unsupported
    for key in ("prompt", "completion"):
        value = fields.get(key)
        if value is None:  # answers under other names are read as pairs, unpaired
            hint = ("" if "completion" in fields else pair_hint(fields)) or (
                missing_prompt_hint(fields) if key == "prompt" else "")
            raise UsageError(f'{where}: field "{key}" is missing {need}; the fields are {sorted(fields)}.{hint}')
        if not isinstance(value, (str, list)):
            raise UsageError(f'{where}: field "{key}" must be a string or a message list {need}.')
    if label is None:
        raise UsageError(f'{where}: field "label" must be true or false (or 1 or 0) {need}; got '
                         f'{fields.get("label")!r}.')
    prompt, completion = fields["prompt"], fields["completion"]
    if isinstance(prompt, str) and isinstance(completion, str) and not chat:
        return UnpairedExample(prompt, completion, label, where)
    prompt_m = (message_tuple(prompt, where, "prompt", names) if isinstance(prompt, list)
                else ({"role": "user", "content": prompt},))
    completion_m = (message_tuple(completion, where, "completion", names) if isinstance(completion, list)
                    else ({"role": "assistant", "content": completion},))
    if not any(m["role"] == "assistant" for m in completion_m):
        raise UsageError(f'{where}: "completion" has no assistant message; it is the answer KTO judges.')
    return UnpairedExample(with_system(prompt_m, fields, where), completion_m, label, where,
                           skip=EMPTY_ANSWER if empty_answer(completion_m) else None, tools=row_tools(fields, where),
                           template_kwargs=row_template_kwargs(fields, where))


def tokenize_unpaired(examples: list[UnpairedExample], tokenizer, chat_template: str | ChatFormat,
                      seq_len: int | None = None, stop_ids: Iterable[int] | None = None,
                      processor=None) -> tuple[list[TokenizedUnpaired], DataReport]:
    """Tokenize every example (``prompt + completion`` cut to ``seq_len``, its start kept; one with images
    through ``processor``, its prompt's placeholders expanded as a preference pair's); skip and report those whose
    completion was truncated away, or whose images do not fit ``seq_len``.

    Raises:
        UsageError: the tokenizer has no EOS, or no example keeps a completion token.
    """
    require_eos(tokenizer)
    fmt = chat_template if isinstance(chat_template, ChatFormat) else ChatFormat(chat_template)
    kept, report = [], DataReport(examples=len(examples))
    for i, example in enumerate(examples):
        if example.skip:
            report.skip(example.skip, example.where)
            continue
        if example.tie:
            report.identical.append(example.where)
            continue
        if example.images:  # vision-language chat templates read each content as parts, as for SFT
            example = replace(example, prompt=tuple(as_parts(example.prompt)),
                              completion=tuple(as_parts(example.completion)))
        prompt = prompt_ids(example, tokenizer, fmt, (example.completion,))
        full = full_ids(example, example.completion, tokenizer, fmt, stop_ids)
        n = common_prefix(prompt, full)
        prompt, completion = full[:n], full[n:]
        media = {}
        if example.images:
            expanded = expanded_prompt(prompt_example(example), n, processor, fmt, seq_len)
            if isinstance(expanded, str):
                report.skip(expanded, example.where)
                continue
            prompt, media, _ = expanded
            refuse_image_tokens(completion, processor, example.where)
        truncated, whole = False, completion
        if seq_len is not None:
            whole = completion[:seq_len]
            room = max(0, seq_len - len(prompt))
            truncated = len(prompt) > seq_len or len(completion) > room
            prompt, completion = prompt[:seq_len], completion[:room]
        report.truncated += truncated
        if not completion:
            report.skip(PROMPT_FILLS_SEQ_LEN, example.where)
        else:
            kept.append(TokenizedUnpaired(prompt, completion, example.desirable, i, whole, truncated, media))
    if not kept and len(report.identical) == len(examples):
        raise UsageError(f"all {len(examples)} KTO examples come from preference pairs whose chosen and rejected "
                         f"answer are the same (first: {first_places(report.identical)}): nothing to learn.")
    if not kept:
        raise report.nothing_to_train(len(examples), "KTO examples")
    return kept, report


def unpaired_collate(units: Sequence[TokenizedUnpaired], pad_id: int, kl_rows: bool,
                     seq_len: int | None = None,
                     kl_completions: Sequence[TokenizedUnpaired] | None = None) -> dict[str, torch.Tensor]:
    """The ``B`` examples, right-padded, then (with ``kl_rows``) the ``B`` mismatched pairs of KTO's KL term.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (completion tokens; -100 on prompt and padding),
    ``[B or 2B, T]``, ``desirable`` ``[B]`` (bool), when every unit has them ``ref_logps`` ``[B or 2B]`` (float64)
    in the same row order, and with images each row's prompt's image tensors
    (:func:`~qlora.chat.image_examples.image_batch`). A KL row is cut to ``seq_len`` tokens, its start kept.
    The ``i``-th KL row pairs ``units[i]``'s prompt (and its images) with its fixed partner's completion
    (``kl_pair_ids``) where the units have one, else with ``kl_completions[i]``'s, by default its predecessor's
    in ``units`` (cyclically); a rank's share of a global micro-batch passes the predecessors in the global one.
    """
    rows = [(u.prompt_ids, u.completion_ids) for u in units]
    if kl_rows:
        if all(u.kl_pair_ids is not None for u in units):
            others = [u.kl_pair_ids for u in units]
        else:
            partners = kl_completions if kl_completions is not None else [units[i - 1] for i in range(len(units))]
            others = [other.kl_completion_ids for other in partners]
        rows += [(u.prompt_ids, other) for u, other in zip(units, others, strict=True)]
    rows = [(p, (p + c)[:seq_len] if seq_len else p + c) for p, c in rows]
    length = max(len(r) for _, r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (prompt, row) in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt):len(row)] = torch.tensor(row[len(prompt):], dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "desirable": torch.tensor([u.desirable for u in units], dtype=torch.bool)}
    if all(u.ref_logps is not None for u in units):
        batch["ref_logps"] = torch.tensor([u.ref_logps[k] for k in range(len(rows) // len(units)) for u in units],
                                          dtype=torch.float64)
    if any(u.media for u in units):  # the rows' prompts: the examples', then the same again for the KL rows
        batch |= image_batch(list(units) * (len(rows) // len(units)), length)
    return batch


def fixed_kl_pairs(units: Sequence[TokenizedUnpaired], batch: int) -> list[TokenizedUnpaired]:
    """``units`` with the other completion of each one's KL row fixed: its predecessor's (cyclically) within
    consecutive runs of ``batch`` units, the last one shorter, so the pairs of micro-batches of ``batch`` units
    taken in this order (TRL's ``KL_completion_ids``, rotated within ``per_device_train_batch_size`` rows)."""
    out = []
    for start in range(0, len(units), batch):
        run = units[start:start + batch]
        out += [replace(u, kl_pair_ids=run[i - 1].kl_completion_ids) for i, u in enumerate(run)]
    return out


def kl_halves(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model inputs and labels of a :func:`unpaired_collate` batch with KL rows, as two batches: the
    examples' rows and the KL rows. Per-row tensors are cut after the ``B`` examples; per-image ones (pixel values,
    image sizes and grids, concatenated in row order) in half, since the KL rows hold the examples' prompts and
    so their images, in the same order."""
    n = batch["desirable"].shape[0]
    main, kl = {}, {}
    for key, value in batch.items():
        if key in ("desirable", "stand_in", "ref_logps"):
            continue
        cut = n if key in _ROW_KEYS or token_aligned(key) else value.shape[0] // 2
        main[key], kl[key] = value[:cut], value[cut:]
    return main, kl
