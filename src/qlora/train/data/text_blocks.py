"""Pre-training texts cut into blocks, as LLaMA-Factory's stage pt builds them (``--group-texts``).

LLaMA-Factory's ``PretrainDatasetProcessor`` (src/llamafactory/data/processor/pretrain.py), with its
default ``packing`` for stage pt, and transformers' run_clm example both train on a stream of text
rather than on one example per text:

1. each text gets the EOS token's text appended and is tokenized without special tokens;
2. the texts are concatenated in groups of ``group`` (the ``batch_size`` of the ``datasets.map`` call
   that runs the processor: LLaMA-Factory's ``preprocessing_batch_size``, 1000 by default); with
   ``shards`` > 1 (its ``preprocessing_num_workers``) the data are first split into that many
   contiguous parts, as ``datasets`` splits them among its workers, and groups never cross a part;
3. each group's tokens are cut into blocks of ``block_size``; what is left over at the end of a
   group (less than a block) is dropped;
4. where the tokenizer adds a BOS token (its ``add_bos_token``), each block's first token is
   replaced by BOS (not inserted: the block keeps its length).

Every token is a label except those equal to the pad token (pad, else EOS, as LLaMA-Factory pads
with EOS when a tokenizer has none; its llama3 and chatml templates first replace the EOS, and under
llama3 the appended text is <|end_of_text|>: :func:`end_tokens`): transformers'
``DataCollatorForLanguageModeling``, which LLaMA-Factory's stage pt uses, gives those no loss, so with
pad = EOS the EOS between texts is not trained. The texts of a block attend to each other (plain causal
attention, positions 0..L-1): unlike ``--packing``, nothing keeps them apart, exactly as in
LLaMA-Factory. qlora's ``--packing`` (:mod:`qlora.train.data.packing`) is not reused: it keeps whole
examples apart in rows of at most ``--seq-len`` tokens, where these blocks cut texts anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from qlora.chat.example import Example
from qlora.chat.tokenize import IGNORE_INDEX, TokenizedExample
from qlora.errors import UsageError
from qlora.train.data.collate import pad_token_id

# LLaMA-Factory's templates that replace the tokenizer's EOS (its ``replace_eos``; src/llamafactory/data/template.py),
# by qlora's name of the template: (the text stage pt appends to each text, the EOS it puts in place, which is also
# its pad token when the tokenizer has none). Under llama3 its pretrain processor appends <|end_of_text|> instead.
_REPLACED_EOS = {"llama-3": ("<|end_of_text|>", "<|eot_id|>"), "chatml": ("<|im_end|>", "<|im_end|>")}


@dataclass(frozen=True)
class BlockReport:
    """What cutting the texts into blocks did, for the run log."""

    texts: int
    tokens: int
    blocks: int
    block_size: int
    dropped: int  # tokens left over at the end of a group

    def summary(self) -> str:
        return (f"{self.texts} texts, {self.tokens} tokens with their EOS, cut into {self.blocks} blocks of "
                f"{self.block_size} tokens ({self.dropped} left over at the ends of groups, not trained)")


def group_bounds(n: int, group: int, shards: int = 1) -> list[tuple[int, int]]:
    """``[start, end)`` of each group of texts: ``n`` split into ``min(shards, n)`` contiguous parts as
    ``datasets.Dataset.shard(contiguous=True)`` splits them, each part cut into runs of ``group``."""
    parts = max(1, min(shards, n))
    div, mod = divmod(n, parts)
    bounds = []
    for index in range(parts):
        start = div * index + min(index, mod)
        end = start + div + (1 if index < mod else 0)
        bounds += [(s, min(s + group, end)) for s in range(start, end, group)]
    return bounds


def end_tokens(tokenizer, template: str) -> tuple[str, int]:
    """``(text appended to each text, pad id)`` as LLaMA-Factory's stage pt has them under ``template``
    (qlora's name of its template: ``llama-3`` and ``chatml`` replace the EOS; others keep the tokenizer's).

    Raises:
        UsageError: the tokenizer has no EOS, or lacks the EOS that the template puts in place.
    """
    if tokenizer.eos_token is None:
        raise UsageError("--group-texts ends every text with the EOS token, and the tokenizer has none: set "
                         "\"eos_token\" in the model's tokenizer_config.json.")
    if template not in _REPLACED_EOS:
        return tokenizer.eos_token, pad_token_id(tokenizer)
    appended, eos = _REPLACED_EOS[template]
    for token in {appended, eos}:
        if token not in tokenizer.get_vocab():
            raise UsageError(f"--template {template} with --group-texts ends texts with {appended} and pads with "
                             f"{eos} (LLaMA-Factory's template replaces the EOS by it), and this tokenizer has no "
                             f"{token} token; use --template auto for a model of another family.")
    pad = tokenizer.pad_token_id
    return appended, pad if pad is not None else tokenizer.convert_tokens_to_ids(eos)


def text_blocks(examples: Sequence[Example], tokenizer, block_size: int, group: int, shards: int = 1,
                template: str = "auto") -> tuple[list[TokenizedExample], BlockReport]:
    """The blocks of ``block_size`` tokens that LLaMA-Factory's stage pt trains on (see the module docstring).

    Args:
        examples: plain-text examples (``--format text``), in the data's order.
        tokenizer: the model's tokenizer.
        block_size: tokens a block (``--seq-len``).
        group: texts concatenated together before cutting (``--group-texts``).
        shards: contiguous parts grouped separately (``--group-shards``).
        template: qlora's name of the chat template, which decides the EOS text and the pad (:func:`end_tokens`).

    Raises:
        UsageError: an example that is not plain text, data too short for one block, or as
            :func:`end_tokens`.
    """
    eos_text, pad = end_tokens(tokenizer, template)
    for example in examples:
        if example.pieces is not None:  # torchtune's text_completion_dataset included: torchtune groups no texts
            raise UsageError(f"{example.where}: --group-texts trains on plain texts, and this row is a torchtune "
                             "dataset's row written piece by piece (each text with its BOS and EOS, tokenized as "
                             "torchtune's tokenizer does), which torchtune never groups; train it without "
                             "--group-texts.")
        if example.text is None or example.prompt is not None:
            raise UsageError(f"{example.where}: --group-texts trains on plain texts, and this row is a "
                             f"{'prompt-completion' if example.text is not None else 'conversation'} row; give "
                             "rows with a text field (--format text), or train without --group-texts.")
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
    blocks: list[TokenizedExample] = []
    tokens = dropped = longest = 0
    for start, end in group_bounds(len(examples), group, shards):
        encoded = tokenizer([e.text + eos_text for e in examples[start:end]], add_special_tokens=False)["input_ids"]
        ids = [t for text_ids in encoded for t in text_ids]
        usable = len(ids) // block_size * block_size
        tokens, dropped, longest = tokens + len(ids), dropped + len(ids) - usable, max(longest, len(ids))
        for at in range(0, usable, block_size):
            block = ids[at:at + block_size]
            if bos is not None:
                block[0] = bos
            blocks.append(TokenizedExample(block, [IGNORE_INDEX if t == pad else t for t in block], len(blocks)))
    report = BlockReport(len(examples), tokens, len(blocks), block_size, dropped)
    if not blocks:
        per = f" in a group of {group} texts" if len(examples) > group or shards > 1 else ""
        raise UsageError(f"the {len(examples)} texts of the data make no block of --seq-len {block_size} tokens"
                         f"{per} ({tokens} tokens with their EOS, {longest} in the longest group); lower --seq-len "
                         "(LLaMA-Factory's cutoff_len) or give more text.")
    return blocks, report

