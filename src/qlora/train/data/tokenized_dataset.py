"""A dataset's examples tokenized for a run, and what that did to them: the :class:`DataReport` the run log shows
(truncated, skipped and why, reasoning placed), and the refusal when nothing is left to train.

Each example goes through :func:`qlora.chat.tokenize.tokenize_example` (or, for rows with images, the model's
processor), which inference shares; the loop over a dataset, its counts and its refusals, which speak of training's
options (``--seq-len``, ``--train-on``), are training's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from qlora.chat.example import Example, blank_text
from qlora.chat.reasoning import has_reasoning, placement
from qlora.chat.thinking_mode import thinking_switch
from qlora.chat.tokenize import IMAGES_TOO_LONG, TokenizedExample, rendering_kwargs, tokenize_example
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat, stop_token_ids

# why a row, preference pair or KTO example is skipped: its prompt takes all of --seq-len, so no answer token is left
# to train or score (TRL keeps such pairs, and its length-normalized losses, CPO's, SimPO's and ORPO's, turn NaN)
PROMPT_FILLS_SEQ_LEN = "a prompt that fills --seq-len, leaving no answer token"
_SHOWN = 5


def first_places(where: list[str]) -> str:
    """The first few of ``where`` for a message, each place once: the two halves of a preference pair that KTO
    trains apart, and the examples one conversation tree gives, come from one line."""
    return ", ".join(list(dict.fromkeys(where))[:_SHOWN])


@dataclass
class DataReport:
    """What tokenization did to a dataset, for the run log."""

    examples: int
    truncated: int = 0
    untrainable: list[int] = field(default_factory=list)
    untrainable_where: list[str] = field(default_factory=list)
    reasoning: int = 0  # examples with reasoning traces
    reasoning_placement: str = ""
    reasoning_hidden: int = 0  # assistant turns whose reasoning the template does not show
    system_dropped: list[str] = field(default_factory=list)  # rows whose system message the template does not render
    template_origin: str = "the chat template"
    identical: list[str] = field(default_factory=list)  # preference rows whose two answers are the same: no signal
    empty: dict[str, list[str]] = field(default_factory=dict)  # why a row holds nothing to train -> where they are
    thinking_rows: int = 0  # rows rendered in the template's thinking mode (their final reasoning shown only there)
    thinking_mode: dict[str, Any] = field(default_factory=dict)  # the switch those rows were rendered with

    def summary(self) -> str:
        """One line for the user: counts, and the first untrainable examples."""
        examples = "example" if self.examples == 1 else "examples"
        text = f"{self.examples} {examples}, {self.truncated} truncated to --seq-len"
        if self.reasoning:
            text += f", {self.reasoning} with reasoning ({self.reasoning_placement})"
        if self.thinking_rows:
            switch = "/".join(self.thinking_mode)
            text += (f"; {self.thinking_rows} rendered in the chat template's thinking mode ({switch} on), which "
                     "inference with the adapter uses too")
        if self.reasoning_hidden:
            turns = "turn" if self.reasoning_hidden == 1 else "turns"
            text += (f"; the chat template does not show the reasoning of {self.reasoning_hidden} assistant {turns} "
                     "(before the last user message), so only their answers are trained: split such "
                     "conversations into one row per turn to train it")
        if self.system_dropped:
            rows = "row" if len(self.system_dropped) == 1 else "rows"
            text += (f"; the chat template ({self.template_origin}) does not render the system message of "
                     f"{len(self.system_dropped)} {rows} (first: {first_places(self.system_dropped)}): it writes "
                     "its own or none, so they are trained without it; --system-into-user puts it in the first user "
                     "turn instead")
        if self.untrainable:
            text += (
                f", {len(self.untrainable)} skipped with no trainable tokens "
                f"(first: {first_places(self.untrainable_where)})"
            )
        if self.identical:
            text += (f", {len(self.identical)} skipped whose chosen and rejected answers are the same (first: "
                     f"{first_places(self.identical)})")
        for reason, where in self.empty.items():
            text += f", {len(where)} skipped with {reason} (first: {first_places(where)})"
        return text

    def cut_or_skipped(self) -> bool:
        """Whether some example was truncated to --seq-len or skipped (held-out data say so: less was scored)."""
        return bool(self.truncated or self.untrainable or self.identical or self.empty)

    def skip(self, reason: str, where: str) -> None:
        """Count a row skipped for ``reason`` (e.g. ``"an empty answer"``)."""
        self.empty.setdefault(reason, []).append(where)

    def nothing_to_train(self, rows: int, what: str = "rows") -> "NothingToTrain":
        """The refusal when every one of ``rows`` rows was skipped (as empty, or as a tie)."""
        skipped = ({**self.empty, "the same chosen and rejected answer": self.identical} if self.identical
                   else self.empty)
        counts = "; ".join(f"{len(where)} with {reason} (first: {first_places(where)})"
                           for reason, where in skipped.items())
        fixes = [f"give {what} with answers (check --format and --data-fields if the answers are in another column)"
                 ] if set(skipped) - {IMAGES_TOO_LONG, PROMPT_FILLS_SEQ_LEN} else []
        if IMAGES_TOO_LONG in skipped:
            fixes.append("raise --seq-len so that their images fit (or bound them with --image-max-pixels)")
        if PROMPT_FILLS_SEQ_LEN in skipped:
            fixes.append("raise --seq-len or shorten the prompts")
        return NothingToTrain(rows, what, counts, "; ".join(fixes))


class NothingToTrain(UsageError):
    """Every row of a dataset was skipped; ``rows``, ``what`` (``"rows"``, ``"preference pairs"``), ``counts``
    (why, where) and ``fix`` (what to do) let held-out data say so in its own words (nothing to evaluate)."""

    def __init__(self, rows: int, what: str, counts: str, fix: str) -> None:
        self.rows, self.what, self.counts, self.fix = rows, what, counts, fix
        super().__init__(f"{self.subject('of the data')} nothing to train: {counts}. Such rows are skipped; {fix}.")

    def subject(self, after: str) -> str:
        """The refusal's subject and verb, ``after`` following the noun: ``all 3 rows of it have``, ``the one row of
        it has``."""
        if self.rows == 1:
            return f"the one {self.what.removesuffix('s')} {after} has"
        return f"all {self.rows} {self.what} {after} have"


def tokenize_dataset(
    examples: list[Example],
    tokenizer,
    chat_template: str | ChatFormat,
    train_on: str = "assistant",
    seq_len: int | None = None,
    stop_ids: Iterable[int] | None = None,
    with_images: Callable[[Example, int], TokenizedExample | str | None] | None = None,
) -> tuple[list[TokenizedExample], DataReport]:
    """Tokenize every example; drop and report those left with no trainable token (those whose answers
    truncation cut away under :data:`PROMPT_FILLS_SEQ_LEN`).

    ``with_images(example, index)`` tokenizes a row with images (the model's processor:
    :func:`~qlora.chat.prefix_suffix.image_row_tokenizer`), or says why the row is skipped; when given (the
    data hold images), every row goes to it first, so the conversations without images are read as parts as in the
    rows with images; it gives None for a row it leaves to :func:`tokenize_example`.

    Raises:
        UsageError: every example is left with no trainable token (e.g. all
            responses truncated away), or as :func:`tokenize_example`.
    """
    stops = set(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    kept, report = [], DataReport(examples=len(examples))
    if isinstance(chat_template, ChatFormat):
        report.template_origin = chat_template.origin
    for i, example in enumerate(examples):
        if example.skip:
            report.skip(example.skip, example.where)
            continue
        tokenized = with_images(example, i) if with_images is not None else None
        if isinstance(tokenized, str):
            report.skip(tokenized, example.where)
            continue
        if tokenized is None:
            tokenized = tokenize_example(example, tokenizer, chat_template, train_on, seq_len, index=i,
                                         stop_ids=stops)
        report.truncated += tokenized.truncated
        reasoning = has_reasoning(example.messages, example.reasoning)
        report.reasoning += reasoning
        if (reasoning and example.messages is not None and example.pieces is None and not example.images
                and isinstance(chat_template, ChatFormat)):
            switch = thinking_switch(rendering_kwargs(example, tokenizer, chat_template), example.template_kwargs)
            report.thinking_rows += bool(switch)
            report.thinking_mode.update(switch)
        report.reasoning_hidden += tokenized.reasoning_hidden
        if tokenized.system_dropped:
            report.system_dropped.append(example.where)
        if tokenized.num_trainable == 0 and tokenized.truncated and not example.images and tokenize_example(
                example, tokenizer, chat_template, train_on, None, index=i, stop_ids=stops).num_trainable:
            report.skip(PROMPT_FILLS_SEQ_LEN, example.where)  # its answer lies past --seq-len, as a pair's does
        elif tokenized.num_trainable == 0:
            report.untrainable.append(i)
            report.untrainable_where.append(example.where)
        else:
            kept.append(tokenized)
    if report.reasoning:
        template = chat_template.template if isinstance(chat_template, ChatFormat) else chat_template
        report.reasoning_placement = placement(template, tokenizer)
    if not kept and report.empty and all(blank_text(examples[i]) for i in report.untrainable):  # all skipped
        for i in report.untrainable:
            report.skip("an empty text", examples[i].where)
        raise report.nothing_to_train(len(examples))
    if not kept and all(blank_text(e) for e in examples):
        raise UsageError(f"all {len(examples)} texts of the data are empty (first: "
                         f"{first_places(report.untrainable_where)}); give texts to train on.")
    if not kept:
        skipped = "".join(f"; {len(where)} skipped with {reason} (first: {first_places(where)})"
                          for reason, where in report.empty.items())
        n, untrainable = len(examples), len(report.untrainable)
        raise UsageError(
            f"{f'all {n}' if untrainable == n else f'{untrainable} of the {n}'} examples have no "
            f"trainable tokens after tokenization (first: {first_places(report.untrainable_where)}){skipped}. "
            f"Usually --seq-len ({seq_len}) is shorter than the prompts, so every response is truncated away; raise "
            "--seq-len or shorten the prompts."
        )
    return kept, report
