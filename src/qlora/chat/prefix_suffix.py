"""PaliGemma's rows with images: its processor's prefix (the images and the prompt) and suffix (the answer).

PaliGemma has no chat format. Its processor takes a prompt and, to train, a ``suffix``, and writes
``<image>...<bos>prompt\\n`` (token type 0, read both ways) then ``answer<eos>`` (type 1, causal, the only labels):
one prompt and one answer, the shape of every task it was trained on (captioning, VQA, detection). A row with
images goes through that call, so its ids, token types, image tensors and labels are transformers'. The prompt is
the text of the turns before the answer (a system message and the user's text, a line each); earlier answers of
OpenAI ``weight`` 0 are context, so they join that text (one prompt string is all the processor takes before the
suffix), and a conversation of several trained answers has no such form and is refused, naming the row. A row
without images beside them is the chat turns a text-only run trains (its prompt the prefix, the rest causal): the
processor takes no prompt without images, and generation prompts a question without images with the run's chat
format, so that is the form the model must learn for them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import torch

from qlora.chat.example import Example
from qlora.chat.image_examples import tokenize_image_example
from qlora.chat.images import PLACEHOLDER
from qlora.chat.prefix_lm import prefix_type, token_types
from qlora.chat.tokenize import IGNORE_INDEX, IMAGES_TOO_LONG, TokenizedExample, tokenize_example
from qlora.errors import UsageError
from qlora.model.image_processor import image_tensors, pixel_bounds, process

IMAGE_TOKEN = "<image>"  # PaliGemma's processor's placeholder (its tokenizer's image_token)


def prompt_and_answer(example: Example, train_on: str = "assistant") -> tuple[str, str]:
    """The prompt (the text before the answer: earlier answers of OpenAI ``weight`` 0 in it, a line each as the
    other turns) and the answer of a conversation whose last turn is its one trained answer.

    Raises:
        UsageError: no assistant answer at the end, a trained one before it, an answer that is not text (tool
            calls, reasoning), or ``train_on`` asking to train the prompt too.
    """
    where, messages = example.where, example.messages or ()
    if train_on == "all" or (train_on == "completion" and example.prompt_turns is None):
        raise UsageError(f"{where}: --train-on {train_on} trains the prompt, but PaliGemma reads its prompt both ways "
                         "(its processor's prefix), so no prompt token can be trained without seeing the ones after "
                         "it. Train the answers (--train-on assistant).")
    answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    trained = [i for i in answers[:-1] if messages[i].get("weight", 1) != 0]  # weight 0: context, in the prompt
    if not answers or trained or answers[-1] != len(messages) - 1:
        last = "" if answers and answers[-1] == len(messages) - 1 else ", its last turn not one"
        earlier = f' ({len(trained)} trained before the last: no "weight": 0)' if trained else ""
        raise UsageError(f"{where}: PaliGemma trains on one prompt and one answer per row with images (its "
                         "processor's prefix and suffix; it has no chat format for several turns), and this row has "
                         f"{len(answers)} assistant answers{earlier}{last}. "
                         "Split the conversation into one row per answer, each ending with it, with the question it "
                         'answers and its images; or mark the earlier answers "weight": 0, which puts them in the '
                         "prompt as context.")
    for i in answers:
        _refuse_non_text(where, messages[i], "its answer (its processor's suffix)" if i == answers[-1] else
                         f"message {i}, an earlier answer in its prompt (its processor's prefix),")
    return _prompt(messages[:-1]), _text(messages[-1].get("content"))


def _refuse_non_text(where: str, answer: dict, what: str) -> None:
    if _text(answer.get("content")) is None or answer.get("tool_calls") or any(
            answer.get(k) for k in ("reasoning_content", "reasoning", "thinking")):
        raise UsageError(f"{where}: PaliGemma reads plain text; {what} holds tool calls, reasoning or other parts. "
                         "Give the answer as text.")


def _prompt(messages: Sequence[dict]) -> str:
    """The prompt of the turns before an answer: their texts (a system message, the user's), a line each."""
    return "\n".join(t for t in (_text(m.get("content")) for m in messages) if t)


def _text(content: Any) -> str | None:
    """A message's text: the string, or its text parts joined (image parts are the processor's); None for other
    parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None if content is not None else ""
    if any(not isinstance(p, dict) or p.get("type") not in ("text", "image", "image_url") for p in content):
        return None
    return "".join(p.get("text") or "" for p in content if p.get("type") == "text")


def tokenize_prefix_suffix(example: Example, processor, train_on: str = "assistant", seq_len: int | None = None,
                           index: int = 0) -> TokenizedExample | str:
    """The ids, labels (the answer's tokens and EOS; none for an answer of OpenAI ``weight`` 0) and model inputs
    (``token_type_ids``, ``pixel_values``) of a PaliGemma row with images, as its processor gives them for
    ``text=<image>...prompt, suffix=answer``; or :data:`IMAGES_TOO_LONG` when the image tokens do not fit
    ``seq_len`` (the text is cut after them).

    Raises:
        UsageError: as :func:`prompt_and_answer`, the processor refusing the images, or the image token written in
            the text.
    """
    prompt, answer = prompt_and_answer(example, train_on)
    tokenizer = processor.tokenizer
    token = _image_token(processor)
    _refuse_image_token(example.where, token, (prompt, answer))
    images = [ref.load(pixel_bounds(processor)) for ref in example.images]
    encoded = process(processor, token * len(images) + prompt, images, example.where,
                      [ref.shown for ref in example.images], suffix=answer)
    ids = encoded["input_ids"][0].tolist()
    types = encoded["token_type_ids"][0]
    trained = (types == 1) & (example.messages[-1].get("weight", 1) != 0)  # weight 0: context only, as elsewhere
    labels = torch.where(trained, encoded["input_ids"][0], IGNORE_INDEX).tolist()
    media = image_tensors(encoded)
    media["token_type_ids"] = types[None]
    truncated = seq_len is not None and len(ids) > seq_len
    if truncated:
        if tokenizer.convert_tokens_to_ids(token) in ids[seq_len:]:
            return IMAGES_TOO_LONG
        ids, labels, media["token_type_ids"] = ids[:seq_len], labels[:seq_len], media["token_type_ids"][:, :seq_len]
    return TokenizedExample(ids, labels, index, truncated, 0, media)


def tokenize_text_row(example: Example, processor, chat_template, train_on: str, seq_len: int | None,
                      index: int, stop_ids: Iterable[int] | None, prefix: int) -> TokenizedExample:
    """A PaliGemma row without images beside rows with them (a conversation, a plain text): as a text-only run trains
    it (a conversation's chat turns, what generation writes for a question without images), its
    ``token_type_ids`` ``prefix`` before its first trained token, as a text-only run's batch gets them
    (:func:`~qlora.chat.prefix_lm.token_types`); the batch's image rows carry their processor's, so this row
    carries its own (else the batch's zeros would read all of it both ways).

    Raises:
        UsageError: the image token written in the text, or as :func:`~qlora.chat.tokenize.tokenize_example`.
    """
    texts = [t for m in example.messages or () for t in [_text(m.get("content"))] if t]
    _refuse_image_token(example.where, _image_token(processor), [*texts, example.text or ""])
    row = tokenize_example(example, processor.tokenizer, chat_template, train_on, seq_len, index=index,
                           stop_ids=stop_ids)
    return replace(row, media={"token_type_ids": token_types(torch.tensor([row.labels]), prefix)})


def _image_token(processor) -> str:
    return getattr(processor, "image_token", None) or IMAGE_TOKEN


def _refuse_image_token(where: str, token: str, texts: Iterable[str]) -> None:
    if any(token in t for t in texts):
        raise UsageError(f"{where}: the row's text holds PaliGemma's image token {token!r}, which stands for "
                         "an image's features where the row has none (its images, if any, go before the prompt). "
                         "Remove it from the text, or give the row its image (an image part, or the images column).")


def image_row_tokenizer(model, processor, chat_template, train_on: str, seq_len: int | None,
                        stop_ids: Iterable[int] | None) -> Callable[[Example, int], TokenizedExample | str | None]:
    """What tokenizes a run's rows once some hold images (``(example, index)``): a prefix-LM's (PaliGemma's) prefix
    and suffix for a row with images and a text-only run's form for any other (:func:`tokenize_text_row`), else
    the chat template's rendering through the processor of conversations
    (:func:`~qlora.chat.image_examples.tokenize_image_example`) and None for plain texts (tokenized as
    text)."""
    prefix = prefix_type(model)
    if prefix is not None:
        return lambda example, index: (
            tokenize_prefix_suffix(example, processor, train_on, seq_len, index) if example.images else
            tokenize_text_row(example, processor, chat_template, train_on, seq_len, index, stop_ids, prefix))
    return lambda example, index: None if example.messages is None and not example.images else tokenize_image_example(
        example, processor, chat_template, train_on, seq_len, index, stop_ids)


def image_prompt(processor, messages: Sequence[dict]) -> str:
    """A prefix-LM's generation prompt for chat ``messages`` (as templates take them) with images: its processor's
    text, one image token per image part then the prompt :func:`prompt_and_answer` trains on (each message's
    text, a line each, earlier answers among them as a row's answers of ``weight`` 0 are; the prefix without a
    suffix, all of it read both ways), where other models render a chat turn. A ``<image>`` placeholder in the text
    is dropped, as a training row's is: the images go before it.

    Raises:
        UsageError: the messages end with an answer (no trained row's prompt does), or an earlier answer holds tool
            calls or reasoning (a training row's is refused so too).
    """
    if messages and messages[-1].get("role") == "assistant":
        raise UsageError("PaliGemma answers one prompt with its images (its processor's prefix; it has no chat "
                         "format to continue an answer in), and these messages end with an answer. End them with "
                         "the question to answer.")
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            _refuse_non_text("these messages", m, f"message {i}, an earlier answer in its prompt (its processor's "
                                                 "prefix),")
    parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
    images = sum(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in parts)
    token = getattr(processor, "image_token", None) or IMAGE_TOKEN
    return token * images + _prompt(messages).replace(PLACEHOLDER, "")
