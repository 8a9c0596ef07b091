"""Examples to ``input_ids`` and ``labels``, with the loss mask exact.

The rules (issue 11), each one a silent fine-tune killer elsewhere:

- token ids are those of ``tokenizer.apply_chat_template`` for the conversation,
  with two repairs: exactly one leading BOS when the tokenizer defines one
  (templates that write BOS and tokenizers that add it never double it), and
  an EOS appended unless the rendering already ends with it;
- that final EOS always counts in the loss, so the model learns to stop, even
  when pad == eos: labels come from the mask computed here, never from
  masking pad ids;
- by default only assistant turns and their end-of-turn tokens are trained.
  Their span is found by rendering prefixes of the conversation (up to the
  generation prompt before the turn, and through the turn) and checking each
  is a token prefix of the whole, so the mask is exact or an error is raised;
- position 0 is never a label (it cannot be predicted), which is also what
  keeps packed examples from learning across their boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.errors import UsageError
from qlora.train.data.formats import Example

IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")
_SHOWN = 5


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels (``IGNORE_INDEX`` where no loss) of dataset item ``index``."""

    input_ids: list[int]
    labels: list[int]
    index: int
    truncated: bool = False

    @property
    def num_trainable(self) -> int:
        """Tokens that count in the loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class DataReport:
    """What tokenization did to a dataset, for the run log."""

    examples: int
    truncated: int = 0
    untrainable: list[int] = field(default_factory=list)
    untrainable_where: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the user: counts, and the first untrainable examples."""
        text = f"{self.examples} examples, {self.truncated} truncated to --seq-len"
        if self.untrainable:
            text += (
                f", {len(self.untrainable)} skipped with no trainable tokens "
                f"(first: {', '.join(self.untrainable_where[:_SHOWN])})"
            )
        return text


def tokenize_example(
    example: Example,
    tokenizer,
    chat_template: str,
    train_on: str = "assistant",
    seq_len: int | None = None,
    index: int = 0,
) -> TokenizedExample:
    """Token ids and labels of one example.

    Args:
        example: a normalized example (messages or text).
        tokenizer: a transformers tokenizer; it must define an EOS token.
        chat_template: Jinja template (see :func:`resolve_chat_template`).
        train_on: ``"assistant"`` (assistant turns + end tokens + final EOS) or
            ``"all"`` tokens. Plain-text examples train on all tokens either way.
        seq_len: keep at most this many tokens. A truncated example keeps its
            first ``seq_len`` tokens and gets no EOS: its answer did not end there.
        index: the example's position in the dataset, kept for reports.

    Raises:
        UsageError: no EOS token, or a template that is not prefix-stable.
    """
    if train_on not in TRAIN_ON:
        raise UsageError(f"unknown train_on {train_on!r}; choose {' or '.join(TRAIN_ON)}.")
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token; set eos_token so examples can teach the model to stop.")
    if example.messages is None:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        mask = [True] * len(ids)
    else:
        ids, mask = _chat_ids_and_mask(example, tokenizer, chat_template)
        if train_on == "all":
            mask = [True] * len(ids)
    ids, mask = _one_bos(ids, mask, tokenizer.bos_token_id)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [True]
    mask[-1] = True
    mask[0] = False
    truncated = seq_len is not None and len(ids) > seq_len
    if truncated:
        ids, mask = ids[:seq_len], mask[:seq_len]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return TokenizedExample(ids, labels, index, truncated)


def tokenize_dataset(
    examples: list[Example],
    tokenizer,
    chat_template: str,
    train_on: str = "assistant",
    seq_len: int | None = None,
) -> tuple[list[TokenizedExample], DataReport]:
    """Tokenize every example; drop and report those left with no trainable token.

    Raises:
        UsageError: every example is left with no trainable token (e.g. all
            responses truncated away), or as :func:`tokenize_example`.
    """
    kept, report = [], DataReport(examples=len(examples))
    for i, example in enumerate(examples):
        tokenized = tokenize_example(example, tokenizer, chat_template, train_on, seq_len, index=i)
        report.truncated += tokenized.truncated
        if tokenized.num_trainable == 0:
            report.untrainable.append(i)
            report.untrainable_where.append(example.where)
        else:
            kept.append(tokenized)
    if not kept:
        raise UsageError(
            f"all {len(examples)} examples have no trainable tokens after tokenization "
            f"(first: {', '.join(report.untrainable_where[:_SHOWN])}). Usually --seq-len "
            f"({seq_len}) is shorter than the prompts, so every response is truncated away; raise "
            "--seq-len or shorten the prompts."
        )
    return kept, report


def _chat_ids_and_mask(example: Example, tokenizer, chat_template: str) -> tuple[list[int], list[bool]]:
    messages = list(example.messages)
    full = _render(tokenizer, chat_template, messages, add_generation_prompt=False)
    mask = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, chat_template, messages[:i], True, full, example.where))
        end = len(_prefix(tokenizer, chat_template, messages[: i + 1], False, full, example.where))
        mask[start:end] = [True] * (end - start)
    return full, mask


def _prefix(tokenizer, chat_template: str, messages, add_generation_prompt: bool, full: list[int], where: str):
    ids = _render(tokenizer, chat_template, messages, add_generation_prompt)
    if full[: len(ids)] != ids:
        raise UsageError(
            f"{where}: the chat template renders the start of this conversation differently from the "
            "whole conversation (it rewrites earlier turns), so the assistant tokens cannot be located "
            "exactly. Use a built-in template (--template chatml, llama-3 or alpaca) instead."
        )
    return ids


def _render(tokenizer, chat_template: str, messages, add_generation_prompt: bool) -> list[int]:
    if not messages and not add_generation_prompt:
        return []
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=True, return_dict=True,
        add_generation_prompt=add_generation_prompt,
    )
    return list(encoded["input_ids"])


def _one_bos(ids: list[int], mask: list[bool], bos_id: int | None) -> tuple[list[int], list[bool]]:
    """Exactly one leading BOS when the tokenizer has one; duplicates removed."""
    if bos_id is None:
        return ids, mask
    k = 0
    while k < len(ids) and ids[k] == bos_id:
        k += 1
    return [bos_id] + ids[k:], [False] + mask[k:]
