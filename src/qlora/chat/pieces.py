"""Rows written as pieces, each tokenized on its own: how tools that encode a conversation message by message
(torchtune's model tokenizers) get their token ids. One tokenization of the joined text differs from theirs where a
piece's first tokens depend on what precedes it (SentencePiece's leading space on each piece, byte-level merges
across a boundary), so such rows keep their pieces until the tokenizer is known.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora.errors import UsageError


@dataclass(frozen=True)
class Piece:
    """A run of a row's tokens, trained or not."""

    text: str
    trained: bool
    token: bool = False  # ``text`` names one token of the vocabulary (a special token written by its name)
    after: str = ""  # encoded after this text, whose own ids are dropped (a continuation without a leading space)
    specials: bool = True  # special tokens written in ``text`` are read as such (False: as plain text)
    limit: int | None = None  # this token ends the row as torchtune's truncate() does (see piece_ids)


def is_written(value) -> bool:
    """Whether ``value`` is a text another tool's reader wrote as pieces (never a file's: its pieces are objects)."""
    return isinstance(value, tuple) and bool(value) and all(isinstance(p, Piece) for p in value)


def piece_ids(pieces: tuple[Piece, ...], tokenizer, where: str) -> tuple[list[int], list[bool], bool]:
    """``(ids, trained, cut)`` of the pieces, each encoded alone without the tokenizer's own BOS/EOS; ``cut``: a
    ``limit`` dropped ids (the data report counts the row as truncated).

    A last token piece with a ``limit`` is torchtune's ``truncate(ids, limit, eos)``, not a token of its own: the
    first ``limit`` ids are kept and the last made this token unless it is one already; that last id is trained
    as the piece says (the last message's flag), or, when ids were cut, as the token it replaces (the message the
    cut falls in, which is the one torchtune's loop stopped at).

    Raises:
        UsageError: a token the vocabulary does not have.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for piece in pieces:
        if piece.limit is not None:
            return _truncated(ids, mask, piece, tokenizer, where)
        if piece.token:
            token_id = tokenizer.convert_tokens_to_ids(piece.text)
            if token_id is None or (token_id == tokenizer.unk_token_id and piece.text != tokenizer.unk_token):
                raise UsageError(f"{where}: the tokenizer has no token {piece.text!r}, which this row's format "
                                 "writes; use a checkpoint of the model family the config names.")
            got = [token_id]
        else:
            got = _encode(tokenizer, piece.after + piece.text, piece.specials)
            if piece.after:
                got = got[len(_encode(tokenizer, piece.after, piece.specials)):]
        ids += got
        mask += [piece.trained] * len(got)
    return ids, mask, False


def _truncated(ids: list[int], mask: list[bool], end: Piece, tokenizer,
               where: str) -> tuple[list[int], list[bool], bool]:
    cut = len(ids) > end.limit
    ids, mask = ids[:end.limit], mask[:end.limit]
    if ids:
        ids[-1] = piece_ids((Piece(end.text, end.trained, token=True),), tokenizer, where)[0][0]
        mask[-1] = mask[-1] if cut else end.trained
    return ids, mask, cut


def _encode(tokenizer, text: str, specials: bool) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=not specials)["input_ids"])
