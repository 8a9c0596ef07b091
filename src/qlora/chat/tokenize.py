"""Examples to ``input_ids`` and ``labels``, with the loss mask exact.

The rules (issues 11 and 20), each one a silent fine-tune killer elsewhere:

- a conversation's token ids are exactly ``tokenizer.apply_chat_template(conversation,
  tokenize=True)``: the template decides about BOS, end-of-turn markers and
  everything else, so training sees what the model sees at inference;
- EOS is appended only when the rendering has no end-of-turn/stop token after
  the final assistant message (the template's own end marker, EOS, or any id of
  ``generation_config.eos_token_id`` counts), and then counts in the loss so
  the model learns to stop, even when pad == eos;
- by default only assistant messages and their end-of-turn markers are trained.
  Templates with ``{% generation %}`` markers give the mask themselves
  (``return_assistant_tokens_mask``). Otherwise each assistant message's
  content is located, in order, in the full rendering, and the tokens covering
  it are found through the character offsets of that one tokenization: never by
  rendering or tokenizing pieces separately, which breaks on templates that
  rewrite earlier turns (Qwen3, DeepSeek-R1, Mistral, Phi-3) and on tokenizers
  that merge across a boundary. An answer is searched after the template opens the model's turn (its generation
  prompt) following the message before it; a message that does not appear there is refused, saying which (a
  judge's template, Granite Guardian's, quotes the answer inside the prompt); ``--train-on all`` trains it whole.
  Markup tokens the template writes between the generation prompt and the answer are the model's to write, so
  they are trained with it (gpt-oss's ``<|channel|>final<|message|>`` after ``<|start|>assistant``, Command A's
  ``<|START_RESPONSE|>``; TRL's gpt-oss training template marks them too);
- reasoning traces go where the template takes them (:mod:`qlora.chat.reasoning`); a turn
  with reasoning is trained from the end of the template's generation prompt (so Qwen3's
  ``<think>``, gpt-oss's analysis channel header are learned), or else from the template's own opening
  of the reasoning (Mistral's ``[THINK]``), through its answer. Reasoning a
  template drops from turns before the last user message (Qwen3, gpt-oss, DeepSeek-R1: the model
  never sees it there at inference) is not trained; reasoning a template drops from the final
  turns too (DeepSeek-R1's templates strip every ``<think>`` block; Kimi-K2-Thinking's shows a reasoning
  field only in an unfinished tool-calling exchange) is put back before the answer, in place of any empty
  block or bare ``</think>`` the template writes there, as the model writes it after the generation prompt
  (TRL's ``deepseek_r1_distill_training`` template renders the same for DeepSeek-R1), so the ids are
  ``apply_chat_template``'s with that block;
- an assistant message that calls tools has no content to search for: its whole turn (markers,
  calls, end of turn) is the text that rendering the conversation up to it adds to the generation
  prompt, located in the full rendering; tool results are never trained;
- prompt-completion rows are masked exactly as TRL's SFTTrainer does: the completion starts where
  the ids of the prompt (rendered alone, with the generation prompt) and of prompt + completion part;
- position 0 is never a label (it cannot be predicted), which is also what
  keeps packed examples from learning across their boundaries.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from qlora.chat.common_ends import common_prefix, common_suffix
from qlora.chat.content_parts import reads_only_parts
from qlora.chat.example import Example, blank_text, render_kwargs
from qlora.chat.images import as_parts
from qlora.chat.pieces import piece_ids
from qlora.chat.reasoning import (REASONING_KEYS, THINK_CLOSE, THINK_OPEN, chunk_reasoning, fold, knows_think_markers,
                                  no_place_error, place_reasoning, reasoning_of, split_think)
from qlora.chat.thinking_mode import final_reasoning_in_thinking_mode, own_switch, without_switch
from qlora.errors import UsageError
from qlora.model import chat_format
from qlora.model.chat_format import END_OF_TURN_TOKENS, ChatFormat, stop_token_ids

IGNORE_INDEX = -100
IMAGES_TOO_LONG = "images that do not fit --seq-len"  # why a row with images is skipped: truncation never cuts an image
TRAIN_ON = ("assistant", "all", "completion")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (``IGNORE_INDEX`` where no loss) of dataset item ``index``; ``reasoning_hidden``
    counts its assistant turns whose reasoning the chat template does not show (so it is not trained);
    ``system_dropped``: the template does not render the row's system message (Phi-4-reasoning's writes its own);
    ``media`` holds a row with images' other model inputs, one entry per tensor the processor returns
    (:mod:`qlora.chat.image_examples`)."""

    input_ids: list[int]
    labels: list[int]
    index: int
    truncated: bool = False
    reasoning_hidden: int = 0
    media: dict[str, Any] = field(default_factory=dict)  # the processor's image tensors (pixel_values, ...)
    system_dropped: bool = False

    @property
    def num_trainable(self) -> int:
        """Tokens that count in the loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


class Unlocated(UsageError):
    """An assistant message's tokens cannot be told apart from the prompt's (the template drops it, or renders it
    inside the prompt): refused when only assistant tokens train; ``--train-on all`` trains the whole text."""


def require_eos(tokenizer) -> None:
    """Refuse a tokenizer without an EOS token: every trained answer ends with it, or the model never learns to stop.

    Raises:
        UsageError: ``tokenizer.eos_token_id`` is None, saying where to set it.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token, so examples cannot teach the model to stop: set "
                         "\"eos_token\" in the model's tokenizer_config.json to the token that ends its text "
                         "(the one generation_config.json's eos_token_id names).")


def tokenize_example(
    example: Example,
    tokenizer,
    chat_template: str | ChatFormat,
    train_on: str = "assistant",
    seq_len: int | None = None,
    index: int = 0,
    stop_ids: Iterable[int] | None = None,
) -> TokenizedExample:
    """Token ids and labels of one example.

    Args:
        example: a normalized example (messages or text).
        tokenizer: a fast transformers tokenizer; it must define an EOS token.
        chat_template: a :class:`ChatFormat` (see :func:`resolve_chat_format`) or a bare Jinja template.
        train_on: ``"assistant"`` (assistant messages + their end markers), ``"all"`` tokens, or
            ``"completion"`` (TRL's SFT default: all tokens but the prompt of prompt-completion rows).
            Plain-text examples train on all tokens either way.
        seq_len: keep at most this many tokens. A truncated example keeps its
            first ``seq_len`` tokens and gets no EOS: its answer did not end there.
        index: the example's position in the dataset, kept for reports.
        stop_ids: ids that end a turn (default: :func:`stop_token_ids` of the tokenizer;
            pass the model's ``generation_config.eos_token_id`` through it).

    Raises:
        UsageError: no EOS token, a template error, or an assistant message the template does not render.
    """
    if train_on not in TRAIN_ON:
        raise UsageError(f"unknown train_on {train_on!r}; choose {' or '.join(TRAIN_ON)}.")
    require_eos(tokenizer)
    fmt = chat_template if isinstance(chat_template, ChatFormat) else ChatFormat(chat_template)
    stops = set(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    hidden, cut, dropped = 0, False, False  # cut: a limit of the row's own pieces dropped ids (torchtune's max_seq_len)
    if blank_text(example) or example.skip:  # nothing to learn; TRL would train an EOS after nothing
        return TokenizedExample([], [], index)
    if example.images:
        raise UsageError(f"{example.where}: this row holds images; they train with --method sft on a "
                         "vision-language model (one with a vision tower and an image processor).")
    if example.pieces is not None:  # written piece by piece, its BOS and EOS among them
        ids, mask, cut = piece_ids(example.pieces, tokenizer, example.where)
        if train_on == "all":
            mask = [True] * len(ids)
        needs_eos = False
    elif example.messages is None:
        # the tokenizer's own BOS setting, as for a raw prompt
        ids = list(tokenizer(_raw_text(example, fmt, tokenizer))["input_ids"])
        mask = [True] * len(ids)
        if example.prompt is not None and train_on != "all":  # TRL: the completion starts where the ids diverge
            prompt_len = common_prefix(list(tokenizer(example.prompt)["input_ids"]), ids)
            mask = [False] * prompt_len + [True] * (len(ids) - prompt_len)
        needs_eos = not ids or ids[-1] != tokenizer.eos_token_id
    elif example.prompt_turns is not None:
        ids, mask, needs_eos = _prompt_completion_ids_and_mask(example, tokenizer, fmt, stops)
        if train_on == "all":
            mask = [True] * len(ids)
    else:
        try:
            ids, mask, needs_eos, hidden, dropped = _chat_ids_and_mask(example, tokenizer, fmt, stops)
        except Unlocated:
            if train_on == "assistant":
                raise
            ids, needs_eos, dropped = _whole_chat_ids(example, tokenizer, fmt, stops)
        if train_on in ("all", "completion"):
            mask = [True] * len(ids)
    if needs_eos:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [True]
    if mask:
        mask[0] = False
    truncated = seq_len is not None and len(ids) > seq_len
    if truncated:
        ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return TokenizedExample(ids, labels, index, truncated or cut, hidden, system_dropped=dropped)


def rendered_text(example: Example, tokenizer, fmt: ChatFormat) -> str:
    """The text of a conversation whose tokens :func:`tokenize_example` gives (before an EOS it appends): the
    chat template's rendering, with the final turns' reasoning put back where the template drops it."""
    return _placed(example, tokenizer, fmt)[0]


def rendering_kwargs(example: Example, tokenizer, fmt: ChatFormat) -> dict:
    """The template kwargs a conversation is rendered with: its tools, and the thinking switch when its final answer's
    reasoning is written in the template's thinking mode (:mod:`~qlora.chat.thinking_mode`), so a prompt
    rendered apart (a preference pair's) is the one its answers follow."""
    return _placed(example, tokenizer, fmt)[1]


def _placed(example: Example, tokenizer, fmt: ChatFormat) -> tuple[str, dict]:
    messages = fmt.messages(for_template(example.messages, fmt.template, tokenizer, example.where, fmt.origin))
    extra = render_kwargs(example)
    rendered = fmt.render(tokenizer, messages, example.where, **extra)
    return _final_reasoning_placed(rendered, messages, tokenizer, fmt, example.where, extra)


def _final_reasoning_placed(rendered: str, messages: Sequence[dict], tokenizer, fmt: ChatFormat, where: str,
                            extra: dict) -> tuple[str, dict]:
    """``(text, template kwargs)``: the rendering with the final turns' reasoning put back where the template drops
    it (:func:`restore_final_reasoning`), else, for a template that hides it and has a thinking mode, the conversation
    in that mode with the reasoning where the model writes it (:mod:`~qlora.chat.thinking_mode`)."""
    text = restore_final_reasoning(rendered, messages)
    default = text
    switch = own_switch(extra)
    if switch and all(v is True for v in switch.values()):  # the row turns thinking on
        default = restore_final_reasoning(fmt.render(tokenizer, messages, where, **without_switch(extra)),
                                          messages)
    thinking = final_reasoning_in_thinking_mode(tokenizer, fmt, messages, default, _markup_strings(tokenizer), where,
                                                extra)
    return thinking if thinking else (text, extra)


def has_generation_markers(template: str) -> bool:
    """Whether the template marks assistant output itself (``{% generation %}`` blocks)."""
    return "generation %}" in template and "endgeneration" in template


def _chat_ids_and_mask(example: Example, tokenizer, fmt: ChatFormat, stops: set[int]):
    """``(ids, mask, needs_eos, reasoning_hidden, system_dropped)`` of a conversation, from one rendering and one
    tokenization."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("qlora needs a fast (Rust) tokenizer to locate assistant tokens by character offsets; "
                         "save the model's tokenizer with tokenizer.json (transformers converts most slow ones).")
    messages = fmt.messages(for_template(example.messages, fmt.template, tokenizer, example.where, fmt.origin))
    weights = [m.get("weight", 1) for m in example.messages if m.get("role") == "assistant"]
    skipped = {k for k, w in enumerate(weights) if w == 0}  # OpenAI's weight 0: in the context, not trained
    extra = render_kwargs(example)
    rendered = fmt.render(tokenizer, messages, example.where, **extra)
    text, extra = _final_reasoning_placed(rendered, messages, tokenizer, fmt, example.where, extra)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # = apply_chat_template's ids
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if has_generation_markers(fmt.template) and text == rendered:
        marked = fmt.render(tokenizer, messages, example.where, tokenize=True, return_dict=True,
                            return_assistant_tokens_mask=True, **extra)
        runs = [_trim_after_stop(ids, run, stops) for run in _runs([bool(m) for m in marked["assistant_masks"]])]
        _check_marked_calls(text, offsets, runs, messages, fmt, example.where)
        if skipped:
            if len(runs) != len(weights):
                raise UsageError(f"{example.where}: the chat template ({fmt.origin}) marks {len(runs)} generation "
                                 f"blocks for {len(weights)} assistant messages, so the messages with weight 0 cannot "
                                 "be told apart; remove their weight, or split the conversation.")
            runs = [run for k, run in enumerate(runs) if k not in skipped]
        char_ends = [offsets[end - 1][1] for _, end in runs]
    else:
        spans = _assistant_spans(text, messages, fmt, example.where,
                                 lambda cursor, i: _tool_call_span(text, cursor, tokenizer, fmt, messages, i,
                                                                   example.where, extra), skipped,
                                 functools.cache(lambda i: _generation_prompt(tokenizer, fmt, messages, i,
                                                                              example.where, extra)),
                                 lambda i: _reasoning_opening(tokenizer, fmt, messages, i, example.where, extra),
                                 _markup_strings(tokenizer), _markup_spans(ids, offsets, tokenizer),
                                 [offsets[k][0] for k, t in enumerate(ids) if t in stops])
        runs = [_tokens_covering(offsets, s, e) for s, e in spans]
        char_ends = [e for _, e in spans]
    mask = [False] * len(ids)
    last_end_has_stop = False
    markup = markup_ids(tokenizer)
    for (start, end), char_end in zip(runs, char_ends):
        end, last_end_has_stop = _with_end_marker(ids, offsets, text, end, char_end, stops, markup)
        mask[start:end] = [True] * (end - start)
    final_is_assistant = (bool(messages) and messages[-1].get("role") == "assistant" and bool(runs)
                          and example.messages[-1].get("weight", 1) != 0)
    hidden = sum(1 for m in messages if m.get("role") == "assistant" and _reasoning_text(m)
                 and _reasoning_text(m) not in text)
    return ids, mask, final_is_assistant and not last_end_has_stop, hidden, _drops_system(example.messages, text)


def _whole_chat_ids(example: Example, tokenizer, fmt: ChatFormat, stops: set[int]) -> tuple[list[int], bool, bool]:
    """``(ids, needs_eos, system_dropped)`` of a conversation whose answers are not located, trained whole: an EOS
    is added when the conversation ends with an assistant message and no stop token follows where its content is
    rendered (anywhere in the text when it is not)."""
    text = rendered_text(example, tokenizer, fmt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    final = example.messages[-1] if example.messages else {}
    dropped = _drops_system(example.messages, text)
    if final.get("role") != "assistant":
        return ids, False, dropped
    content = _content(final).strip()
    at = text.rfind(content) if content else -1
    tail = [t for t, (a, _) in zip(ids, encoded["offset_mapping"]) if a >= max(at, 0)]
    return ids, not any(t in stops for t in tail), dropped


def _drops_system(messages: Sequence[dict], text: str) -> bool:
    """Whether a system message of the row is missing from the template's rendering ``text``."""
    return any(m.get("role") == "system" and _content(m).strip() not in text for m in messages)


def _reasoning_field(message: dict) -> str | None:
    """An assistant message's reasoning given apart from its answer (a field, or thinking chunks), or None."""
    field = reasoning_of(message)
    return field[1] if field else (chunk_reasoning(message) or None)


def _reasoning_text(message: dict) -> str:
    """An assistant message's reasoning (a field, thinking chunks, or its content's ``<think>`` block), stripped;
    '' if none."""
    field = _reasoning_field(message)
    parts = (field, "") if field else split_think(_content(message))
    return parts[0].strip() if parts else ""


def _prompt_completion_ids_and_mask(example: Example, tokenizer, fmt: ChatFormat, stops: set[int]):
    """``(ids, mask, needs_eos)`` of a conversational prompt-completion row, as TRL's SFTTrainer builds them:
    the ids of prompt + completion rendered together; the completion is trained from where they stop
    agreeing with the ids of the prompt rendered alone with the generation prompt."""
    messages = for_template(example.messages, fmt.template, tokenizer, example.where, fmt.origin)
    extra = render_kwargs(example)

    def ids_of(turns: Sequence[dict], prompt: bool, kwargs: dict) -> list[int]:
        out = fmt.render(tokenizer, turns, example.where, add_generation_prompt=prompt, tokenize=True,
                         return_dict=True, **kwargs)
        return list(out["input_ids"])

    rendered = fmt.render(tokenizer, messages, example.where, **extra)  # the completion's reasoning put back
    text, placed = _final_reasoning_placed(rendered, fmt.messages(messages), tokenizer, fmt, example.where, extra)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text != rendered else ids_of(
        messages, False, extra)
    prompt_len = common_prefix(ids_of(messages[:example.prompt_turns], True, placed), ids)
    mask = [False] * prompt_len + [True] * (len(ids) - prompt_len)
    return ids, mask, not any(t in stops for t in ids[prompt_len:])


def for_template(messages: Sequence[dict], template: str, tokenizer=None, where: str = "",
                 origin: str = "the chat template") -> list[dict]:
    """Messages as ``template`` can take them (:func:`qlora.model.chat_format.for_template`: roles,
    tool calls), with reasoning where the template (or ``tokenizer``'s ``<think>`` markers) takes it
    (:func:`~qlora.chat.reasoning.place_reasoning`), and each content as parts for a template that reads only parts
    (:func:`~qlora.chat.content_parts.reads_only_parts`: LLaVA's prints no text of a string content).

    Raises:
        UsageError: an assistant turn has reasoning the template has no place for (naming ``where``).
    """
    shaped = chat_format.for_template(messages, template)
    placed = place_reasoning(shaped, template, tokenizer, where, origin)
    return as_parts(placed) if reads_only_parts(template) else placed


def restore_final_reasoning(text: str, messages: Sequence[dict]) -> str:
    """``text`` with the reasoning of each assistant turn after the last user message put back before its answer
    when the template dropped it: what the model writes after the generation prompt, so the reasoning is trained.

    A ``<think>`` block of the content (DeepSeek-R1's templates strip it from every turn) is put back as written; a
    reasoning field (Kimi-K2-Thinking's template shows it only in a tool-calling exchange still under way) as a
    ``<think>`` block. Markup the template writes in its place before the answer (an empty ``<think></think>``, or
    DeepSeek-V3.1's ``</think>`` that closes its non-thinking generation prompt) is replaced by the block, since the
    model writes the block there."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    cursor = 0
    if users:
        last = _content(messages[users[-1]])
        at = text.rfind(last) if last else -1
        cursor = at + len(last) if at >= 0 else 0
    for m in messages[(users[-1] + 1) if users else 0:]:
        content = m.get("content")
        if m.get("role") != "assistant" or not isinstance(content, str) or m.get("tool_calls"):
            continue
        field = _reasoning_field(m)
        parts = (field.strip(), content) if field else split_think(content)
        if not parts or not parts[0] or _find(text, parts[0], cursor):
            continue
        rest = content if field else content.rsplit(THINK_CLOSE, 1)[1]
        for shown in dict.fromkeys((rest, rest.lstrip(), rest.strip())):
            at = text.find(shown, cursor) if shown else -1
            if at < 0:
                continue
            if field and _THINK_MARKUP.search(text, cursor, at) is None:  # a short answer met first in the header
                at = next((k for k in _starts(text, shown, at + 1) if _THINK_MARKUP.search(text, cursor, k)), at)
            written = _THINK_MARKUP.search(text, cursor, at)
            if field:
                if written is None:
                    break  # no place in this rendering where the model writes reasoning
                space = written.group(1) or ""
                block = f"{THINK_OPEN}{space[:len(space) // 2]}{parts[0]}{space[len(space) // 2:]}{THINK_CLOSE}"
                block += written.group(2)
            else:
                block = content[:content.rfind(shown)]
            begin = written.start() if written else at
            text = text[:begin] + block + text[at:]
            cursor = begin + len(block) + len(shown)
            break
    return text


def _starts(text: str, needle: str, start: int) -> Iterator[int]:
    """Where ``needle`` starts in ``text`` from ``start`` on, in order."""
    at = text.find(needle, start)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


# What a template writes before an answer in place of its reasoning: an empty block, or the closing tag alone
_THINK_MARKUP = re.compile(r"(?:<think>(\s*))?</think>(\s*)\Z")


def _generation_prompt(tokenizer, fmt: ChatFormat, messages: Sequence[dict], i: int, where: str, extra: dict) -> str:
    """What the template's generation prompt adds after messages ``[:i]`` ('' when it is not a plain suffix, or the
    template fails on those messages alone: Qwen3.5's on a system message without a user turn after it)."""
    if i == 0 or "add_generation_prompt" not in fmt.template:  # a template that never reads the flag has none
        return ""
    try:
        plain = fmt.render(tokenizer, messages[:i], where, **extra)
        prompted = fmt.render(tokenizer, messages[:i], where, add_generation_prompt=True, **extra)
    except UsageError:  # the row itself rendered: this prefix is only a probe
        return ""
    return prompted[len(plain):] if prompted.startswith(plain) else ""


def _reasoning_opening(tokenizer, fmt: ChatFormat, messages: Sequence[dict], i: int, where: str, extra: dict) -> str:
    """The markup the template writes just before assistant message ``i``'s reasoning (Mistral's ``[THINK]``): what
    rendering messages ``[:i + 1]`` adds before the reasoning where it departs from rendering them with that message's
    answer alone ('' when the reasoning is not found after that point)."""
    reasoning = _reasoning_text(messages[i])
    bare = {k: v for k, v in messages[i].items() if k not in REASONING_KEYS}
    parts = split_think(_content(bare))
    bare["content"] = parts[1] if parts else _content(bare)
    full = fmt.render(tokenizer, messages[:i + 1], where, **extra)
    plain = fmt.render(tokenizer, [*messages[:i], bare], where, **extra)
    n = common_prefix(full, plain)
    at = full.find(reasoning, n) if reasoning else -1
    return full[n:at] if at >= 0 else ""


def _raw_text(example: Example, fmt: ChatFormat, tokenizer) -> str:
    """A plain row's text; a reasoning column becomes a ``<think>`` block before the completion when the model
    knows those markers (there is no template to place it otherwise).

    Raises:
        UsageError: a reasoning column, and a model without ``<think>`` markers.
    """
    text = example.text
    if example.reasoning is not None:
        key, reasoning = example.reasoning
        if not knows_think_markers(fmt.template, tokenizer):
            raise no_place_error(example.where, key, f"{fmt.origin}; plain prompt-completion rows are not rendered "
                                 "with it, so only <think> markers could hold the reasoning")
        text = fold(reasoning, text)
    return text if example.prompt is None else example.prompt + text


def _tool_call_span(text: str, cursor: int, tokenizer, fmt: ChatFormat, messages: Sequence[dict], i: int,
                    where: str, extra: dict) -> tuple[int, int] | None:
    """Where assistant message ``i``, which calls tools (so it may have no content to search for), is
    rendered in ``text`` at or after ``cursor``, or None if the template drops its calls.

    The turn's text is what rendering messages ``[:i + 1]`` adds to the generation prompt of messages
    ``[:i]`` (also without a leading reasoning block, which templates such as Qwen3 add to the last turn
    only, and without its end-of-turn marker, found again by the caller). Templates that place other
    messages by position (Mistral puts the system message in the last user turn) make that text begin with
    some prompt: the longest part of it, cut after whitespace or a special token, that ``text`` holds past
    the prompt is the turn."""
    before = fmt.render(tokenizer, messages[:i], where, add_generation_prompt=True, **extra) if i else ""
    upto = fmt.render(tokenizer, messages[:i + 1], where, **extra)
    first, second = (tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in (before, upto))
    ids, offsets = second["input_ids"], second["offset_mapping"]
    n = common_prefix(first["input_ids"], ids)
    # A generation prompt that opens a block (DeepSeek-V3's "<think>") can share a first character with the turn
    # ("<｜tool▁calls▁begin｜>"): the turn starts after the last special token or whitespace before the split.
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    def plain(k: int) -> bool:  # neither a special token nor ending in whitespace or before it (MiniMax's "]~b]ai\n")
        return ids[k] not in special and not upto[offsets[k][0]:offsets[k][1] + 1][-1:].isspace()

    while 0 < n < len(ids) and plain(n - 1):
        n -= 1
    start = offsets[n][0] if n < len(ids) else len(upto)
    turn = upto[start:].strip()
    forms = [turn, re.sub(r"^<think>.*?</think>\s*", "", turn, flags=re.S)]
    for form in list(forms):
        bare = form
        for marker in (*END_OF_TURN_TOKENS, tokenizer.eos_token or ""):
            if marker and bare.endswith(marker):
                bare = bare[:-len(marker)].rstrip()
        forms.append(bare)
    # A template that writes its generation prompt unasked (Command A's ends every rendering with the chatbot turn's
    # opening) ends the turn with it too, where the conversation goes on with another turn: the turn without what it
    # shares with the end of the prompt (its end marker is found again by the caller).
    tail = common_suffix(before, upto)
    if tail and upto[:len(upto) - tail].strip() and upto[start:len(upto) - tail].strip():
        forms.append(upto[start:len(upto) - tail].strip())
    names = [c.get("function", c).get("name", "") for c in messages[i]["tool_calls"]]
    markers = _markup_strings(tokenizer)
    for form in dict.fromkeys(f for f in forms if f):
        for cut in range(len(form)):
            if cut and not (form[cut - 1].isspace() or any(form.endswith(m, 0, cut) for m in markers if m)):
                continue
            found = _find(text, form[cut:], cursor)
            if found and all(name in text[found[0]:found[1]] for name in names):
                return found
    return None


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True."""
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _trim_after_stop(ids: list[int], run: tuple[int, int], stops: set[int]) -> tuple[int, int]:
    """A marked run ends at its last stop token: the model stops there and never writes what follows."""
    start, end = run
    last = max((k for k in range(start, end) if ids[k] in stops), default=None)
    return (start, last + 1) if last is not None else run


def _tokens_covering(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """``[first, last + 1)`` of the tokens overlapping characters ``[start, end)``."""
    covering = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
    return covering[0], covering[-1] + 1


def _markup_strings(tokenizer) -> list[str]:
    """The text of the tokenizer's special and added tokens."""
    return [str(t) for t in tokenizer.all_special_tokens] + [
        str(getattr(t, "content", t)) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]


def _markup_spans(ids: Sequence[int], offsets: Sequence[tuple[int, int]], tokenizer) -> list[tuple[int, int]]:
    """The character spans of the special and added tokens among ``ids``, in order."""
    markup = markup_ids(tokenizer)
    return [offsets[k] for k, t in enumerate(ids) if t in markup]


def markup_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special and added tokens: template markup, never text a message holds."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def _with_end_marker(ids, offsets, text: str, end: int, char_end: int, stops: set[int],
                     markup: set[int]) -> tuple[int, bool]:
    """Extend a trained run (tokens up to ``end``, text up to ``char_end``) over its end-of-turn
    marker: whitespace and markup tokens that close the answer (Command R7B's ``<|END_RESPONSE|>``),
    then stop tokens; the model writes all of them before it stops.

    Returns the new end and whether a stop token ends the turn."""
    if end > 0 and ids[end - 1] in stops:
        return end, True
    j = end
    while j < len(ids) and ids[j] not in stops and (ids[j] in markup or not text[offsets[j][0]:offsets[j][1]].strip()):
        j += 1
    if j < len(ids) and ids[j] in stops:
        while j < len(ids) and ids[j] in stops:
            j += 1
        return j, True
    # A known end-of-turn marker that this vocabulary spells as plain text: trained, but not a stop token.
    rest = text[char_end:]
    marker = next((m for m in END_OF_TURN_TOKENS if rest.lstrip().startswith(m)), None)
    if marker:
        stop_char = char_end + len(rest) - len(rest.lstrip()) + len(marker)
        while end < len(ids) and offsets[end][0] < stop_char:
            end += 1
    return end, False


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # multimodal-style parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _find(text: str, needle: str, cursor: int, markup: Sequence[tuple[int, int]] = ()) -> tuple[int, int] | None:
    """The first occurrence of ``needle`` (as is, then stripped) at or after ``cursor``, but for one that is a part
    of a markup token's text (``markup``: their character spans, in order), which never renders a message: a
    one-letter answer is not the ``t`` of ``<think>``."""
    starts = [s for s, _ in markup]
    for candidate in dict.fromkeys((needle, needle.strip())):
        if candidate:
            at = text.find(candidate, cursor)
            while at >= 0 and _inside_markup(markup, starts, at, at + len(candidate)):
                at = text.find(candidate, at + 1)
            if at >= 0:
                return at, at + len(candidate)
    return None


def _inside_markup(markup: Sequence[tuple[int, int]], starts: list[int], begin: int, end: int) -> bool:
    """Whether ``[begin, end)`` lies within one markup span, short of all of it."""
    k = bisect.bisect_right(starts, begin) - 1
    return k >= 0 and end <= markup[k][1] and (begin, end) != tuple(markup[k])


def _find_assistant(text: str, message: dict, cursor: int, generation_prompt: Callable[[], str] = lambda: "",
                    opening: Callable[[], str] = lambda: "",
                    markup: Sequence[tuple[int, int]] = (), stops: Sequence[int] = (),
                    following: str = "") -> tuple[int, int] | None:
    """Where an assistant message is rendered: its content whole, or, for a message with reasoning (a field,
    thinking chunks or a ``<think>`` block in the content), its reasoning + answer as the template reformats them,
    from the end of the generation prompt (the model writes what follows it: ``<think>``, a channel header) or from
    the template's ``opening`` markup of the reasoning, or the answer alone when the template drops the reasoning of
    this turn (``markup``: as for :func:`_find`; ``stops``, ``following``: as for :func:`_ending_turn`)."""
    content = _content(message)
    field = _reasoning_field(message)
    parts = (_reasoning_text(message), content.strip()) if field else split_think(content)
    if parts is None:
        found = _ending_turn(text, _find(text, content, cursor, markup), stops, markup, following)
        empty = _EMPTY_THINK.search(text, cursor, found[0]) if found else None
        return (empty.start(), found[1]) if empty else found
    reasoning, answer = parts
    think = _find(text, reasoning, cursor, markup) if reasoning else None
    first_answer = _find(text, answer, cursor, markup) if answer else None
    # this turn's reasoning, not a later one's: the answer is not met (ending a turn) before it
    if think and (first_answer is None or first_answer[0] >= think[0] or not _ends_turn(text, first_answer, stops)):
        after = (_ending_turn(text, _find(text, answer, think[1], markup), stops, markup, following) if answer
                 else (think[1], think[1]))
        if after:
            return _turn_start(text, cursor, think[0], generation_prompt(), opening), after[1]
    if field is None:
        found = _find(text, content, cursor, markup)  # a template that prints the <think> block as plain text
        if found:
            return found
    return first_answer


def _ends_turn(text: str, found: tuple[int, int], stops: Sequence[int]) -> bool:
    """Whether the text at ``found`` ends a turn: only whitespace comes before the next stop token (``stops``: where
    they start, in order); True where the text has none to tell."""
    k = bisect.bisect_left(stops, found[1])
    return not stops or (k < len(stops) and not text[found[1]:stops[k]].strip())


def _ending_turn(text: str, found: tuple[int, int] | None, stops: Sequence[int], markup: Sequence[tuple[int, int]],
                 following: str = "") -> tuple[int, int] | None:
    """``found`` (an answer's text, first met after the message before it), or where that text comes again to end the
    turn, right before the stop token that ends it (``stops``: where the text's stop tokens start, in order), when
    ``found`` does not and the next message's text (``following``) is not between them: a short answer ("a", "is",
    "assistant") is first met inside the turn's header, which a template without a generation prompt writes with the
    user's turn (Yi's ``<|im_start|>assistant``), or which the model writes after it (gpt-oss's
    ``<|channel|>final<|message|>``, Qwen3.5's ``assistant`` before the empty ``<think>`` block)."""
    k = bisect.bisect_left(stops, found[1]) if found else len(stops)
    if k == len(stops) or _ends_turn(text, found, stops):
        return found
    needle, starts = text[found[0]:found[1]], [s for s, _ in markup]
    at = text.rfind(needle, found[0] + 1, stops[k])
    while at >= 0 and (text[at + len(needle):stops[k]].strip() or _inside_markup(markup, starts, at, at + len(needle))):
        at = text.rfind(needle, found[0] + 1, at + len(needle) - 1)
    if at < 0 or (following.strip() and following.strip() in text[found[1]:at]):
        return found  # none, or one in a later turn (a template that ends a turn with no stop token: GLM's)
    return at, at + len(needle)


# An empty reasoning block a template writes before an answer without reasoning (Qwen3's final turn, GLM's every
# turn): the model writes it too, so it is trained with the answer, unless the generation prompt writes it
# (:func:`_past_prompt_think`).
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*\Z")


def _past_prompt_think(text: str, found: tuple[int, int], generation_prompt: str | None) -> tuple[int, int]:
    """``found`` without the empty reasoning block it starts with when the generation prompt that opens the turn
    writes that block (Qwen3's with enable_thinking off): the prompt gives it, the model does not write it."""
    empty = _EMPTY_THINK_START.match(text, found[0], found[1])
    if empty and generation_prompt and _EMPTY_THINK.search(generation_prompt):
        return empty.end(), found[1]
    return found


_EMPTY_THINK_START = re.compile(r"<think>\s*</think>\s*")


def _turn_start(text: str, cursor: int, start: int, generation_prompt: str, opening: Callable[[], str]) -> int:
    """Where the model starts writing a turn whose reasoning starts at ``start``: after the generation prompt
    (found between ``cursor`` and ``start``), else at the ``<think>`` tag just before it, else at the template's
    ``opening()`` markup just before it, else at ``start``."""
    for prompt in dict.fromkeys((generation_prompt, generation_prompt.rstrip())):
        at = text.rfind(prompt, cursor, start) if prompt.strip() else -1
        if at >= 0:
            return at + len(prompt)
    tag = text.rfind(THINK_OPEN, cursor, start)  # the model writes the opening tag itself
    if tag >= 0 and not text[tag + len(THINK_OPEN):start].strip():
        return tag
    markup = opening()
    return start - len(markup) if markup and text.endswith(markup, cursor, start) else start


def _call_names(message: dict) -> list[str]:
    return [c.get("function", c).get("name", "") for c in message.get("tool_calls") or ()]


def _dropped_calls(where: str, k: int, n: int, i: int, message: dict, origin: str) -> Unlocated:
    return Unlocated(
        f"{where}: assistant message {k} of {n} (message {i + 1} of the conversation, calling {_call_names(message)}): "
        f"the chat template ({origin}) drops these tool calls, or renders them elsewhere than in this turn (or "
        "differently inside the conversation than as its last turn), so their tokens cannot be located and the model "
        "would learn to answer this request without calling. Use a template that renders tool calls, or train on the "
        "whole text with --train-on all.")


def _check_marked_calls(text: str, offsets, runs: list[tuple[int, int]], messages: Sequence[dict], fmt: ChatFormat,
                        where: str) -> None:
    """Refuse a tool-calling turn whose ``{% generation %}`` block does not hold its calls (SmolLM3's template marks
    an empty turn for it): trained so, the model would learn to answer a tool request with nothing."""
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if len(runs) != len(assistants):
        return
    for k, (i, (start, end)) in enumerate(zip(assistants, runs), 1):
        shown = text[offsets[start][0]:offsets[end - 1][1]]
        if not all(name in shown for name in _call_names(messages[i])):
            raise _dropped_calls(where, k, len(assistants), i, messages[i], fmt.origin)


def _assistant_spans(text: str, messages: Sequence[dict], fmt: ChatFormat, where: str,
                     tool_call_span: Callable[[int, int], tuple[int, int] | None],
                     skipped: set[int] = frozenset(),
                     generation_prompt: Callable[[int], str] = lambda i: "",
                     reasoning_opening: Callable[[int], str] = lambda i: "",
                     markers: Sequence[str] = (), markup: Sequence[tuple[int, int]] = (),
                     stops: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Character spans of each assistant message's content in ``text``, in order, but for the assistant
    messages numbered (from 0) in ``skipped``; a message that calls tools spans the whole turn the template
    writes for it (``tool_call_span(cursor, i)``: content and calls); a message with reasoning starts where
    ``generation_prompt(i)`` (the template's, after messages ``[:i]``) ends, or at ``reasoning_opening(i)``; no
    message is found inside a markup token's text (``markup``: their character spans, in order), and a short answer
    met first in its turn's header is the text that ends the turn, before its stop token (``stops``: where stop
    tokens start, in order; :func:`_ending_turn`).

    Raises:
        Unlocated: an assistant message is not rendered, or is rendered inside the prompt: after the message before
            it but before the generation prompt (``markers``: the tokenizer's markup strings) starts the model's turn.
    """
    spans, cursor = [], 0
    seen: list[str] = []  # the generation prompts of earlier turns: one that opens this turn spares rendering its own
    assistants = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    for k, i in enumerate(assistants, 1):
        content = _content(messages[i])
        prompt_end = None
        if i > 0 and messages[i - 1].get("role") != "assistant":  # skip past the prompt, so text it quotes is not taken
            prompt = _find(text, _content(messages[i - 1]), cursor, markup)
            if prompt:
                cursor = prompt_end = prompt[1]
        if messages[i].get("tool_calls"):
            found = tool_call_span(cursor, i)
            if found is None:
                raise _dropped_calls(where, k, len(assistants), i, messages[i], fmt.origin)
            if k - 1 not in skipped:
                spans.append(found)
            cursor = found[1]
            continue
        if not content.strip() and not _reasoning_field(messages[i]):
            continue  # nothing to learn but the end marker, whose place is unknown
        following = _content(messages[i + 1]) if i + 1 < len(messages) else ""
        found = _find_assistant(text, messages[i], cursor, lambda i=i: generation_prompt(i),
                                lambda i=i: reasoning_opening(i), markup, stops, following)
        if found is None:
            shown = content.strip()[:60]
            raise Unlocated(
                f"{where}: assistant message {k} of {len(assistants)} (message {i + 1} of the conversation, "
                f"starting {shown!r}) does not appear in the text that the chat template ({fmt.origin}) renders for "
                "this conversation: the template drops or rewrites it, so its tokens cannot be located and the model "
                "would never see them in this format. Fix or remove that message in the data (check that it is "
                "plain text the template prints as is), or train on the whole text with --train-on all."
            )
        opened = opener = None
        if prompt_end is not None:
            opener = next((g for g in seen if _opens_before(text, prompt_end, g, markers, found)), None)
        if prompt_end is not None and opener is None:
            opened = _turn_opening(text, prompt_end, generation_prompt(i), markers)
            opener = generation_prompt(i)
            seen += [generation_prompt(i)] if generation_prompt(i).strip() else []
        # found in the prompt, or in the opening itself: the answer is after the turn opens (a found span that ends past
        # the opening starts with the empty <think> block a template writes there, Qwen3.5's: the model writes its end)
        if opened is not None and found[1] <= opened[1] and not _continues_turn(text, messages, i, prompt_end,
                                                                                 found[0], markers):
            found = _find_assistant(text, messages[i], opened[1], lambda i=i: generation_prompt(i),
                                    lambda i=i: reasoning_opening(i), markup, stops, following
                                    ) if opened[0] >= 0 else None
            if found is None:
                raise Unlocated(
                    f"{where}: assistant message {k} of {len(assistants)} (message {i + 1} of the conversation, "
                    f"starting {content.strip()[:60]!r}) is rendered by the chat template ({fmt.origin}) inside the "
                    f"prompt: no {generation_prompt(i).strip()!r} (the template's generation prompt, which starts the "
                    "model's turn) comes before it, so the model reads this answer as input and would learn to write "
                    "text it is only ever given (a judge's template, such as Granite Guardian's, quotes the answer it "
                    "judges). Use a template that renders the answer as the assistant's turn, or train on the whole "
                    "text with --train-on all.")
        found = _past_prompt_think(text, found, opener)
        if opener is not None:
            found = _from_prompt_markup(text, found, prompt_end, opener, markup)
        if k - 1 not in skipped:
            spans.append(found)
        cursor = found[1]
    return spans


def _from_prompt_markup(text: str, found: tuple[int, int], prompt_end: int, generation_prompt: str,
                        markup: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``found`` from the end of the generation prompt that opens its turn where markup tokens come between them: the
    model writes them before its answer (gpt-oss's ``<|channel|>final<|message|>`` after ``<|start|>assistant``), as
    it writes a reasoning turn's header; whitespace, or text with no markup token, is the answer's own. A reasoning
    block there is left to the reasoning rules (an empty one the model writes is trained, a dropped one is not)."""
    for prompt in dict.fromkeys((generation_prompt, generation_prompt.rstrip())):
        at = text.rfind(prompt, prompt_end, found[0]) if prompt.strip() else -1
        if at >= 0:
            start = at + len(prompt)
            gap = text[start:found[0]]
            if (gap.strip() and THINK_OPEN not in gap and THINK_CLOSE not in gap
                    and any(start <= b and e <= found[0] for b, e in markup)):
                return start, found[1]
            return found
    return found


def _continues_turn(text: str, messages: Sequence[dict], i: int, prompt_end: int, start: int,
                    markers: Sequence[str]) -> bool:
    """Whether assistant message ``i`` goes on the model's turn that its tool results were written into: it follows
    a tool result, after a tool-calling assistant message, with no markup between that result and it (Apertus writes
    tool outputs inside the assistant's turn and the answer right after them, its generation prompt opening a new
    turn only when the conversation stops there)."""
    before = [m.get("role") for m in messages[:i]]
    if not before or before[-1] != "tool" or "assistant" not in before:
        return False
    caller = max(k for k, role in enumerate(before) if role == "assistant")
    between = text[prompt_end:start]
    return bool(messages[caller].get("tool_calls")) and not any(m and m in between for m in markers)


def _opens_before(text: str, start: int, generation_prompt: str, markers: Sequence[str],
                  found: tuple[int, int]) -> bool:
    """Whether ``generation_prompt`` opens a turn after ``start`` that the span ``found`` ends past."""
    opened = _turn_opening(text, start, generation_prompt, markers)
    return opened is not None and found[1] > opened[1]


def _turn_opening(text: str, start: int, generation_prompt: str, markers: Sequence[str]) -> tuple[int, int] | None:
    """Where the model's turn opens in ``text`` after the prompt ending at ``start``: the first of the template's
    generation prompt, its first word, or a markup token of it, since templates write a turn of the conversation
    otherwise than the prompt that starts one (DeepSeek-R1's prompt also opens ``<think>``, DeepSeek-V3.2's writes
    ``<think></think>`` where its turns after a tool result hold ``</think>``), as ``(begin, end)``; ``(-1, past the
    end of text)`` when it never opens there, None when the template has no generation prompt to tell."""
    head = generation_prompt.strip()
    if not head:
        return None
    found = [(at, -len(form)) for form in {head, head.split()[0], *(m for m in markers if m and m in head)}
             if (at := text.find(form, start)) >= 0]
    if not found:
        return -1, len(text) + 1
    at, negative = min(found)
    return at, at - negative
