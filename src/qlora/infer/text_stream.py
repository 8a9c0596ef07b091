"""Token ids in, text pieces out: incremental detokenization with stop strings.

A reply is re-decoded as a whole after each token and only the new suffix is
released, so the pieces join to exactly ``tokenizer.decode(tokens,
skip_special_tokens=True)`` even where one character spans several tokens (a
trailing partial UTF-8 character, shown as U+FFFD, is held back). With stop
strings, text that could still grow into one is held back too, and a match ends
the stream with the text before it (the OpenAI ``stop`` semantics).

SentencePiece-style tokenizers (Llama 2, Mistral, Gemma) spell characters outside
their vocabulary as ``<0xNN>`` byte tokens, and their decoder turns a whole run of
byte tokens into text at once: one invalid byte makes every byte of the run U+FFFD,
valid characters before it included. Decoding is prefix-stable only where a run
ends, so text from a trailing run of byte tokens is held back until the run ends. A special token that decoding
leaves out does not end a run: the bytes on both sides of it decode as one run.

Special tokens are dropped from the text, except those named in ``keep``: tool-call
markup such as Mistral's ``[TOOL_CALLS]`` is a special token, and a parser must see it.
vLLM's decoding options are honoured as it defines them: ``skip_special_tokens=False`` shows
every special token; ``include_stop`` (``include_stop_str_in_output``) keeps a matched stop
string, and the stop token that ended the reply, in the text (:meth:`TextStream.end` leaves
that token's text out otherwise); with ``min_tokens``, stop strings are only looked for in text
that tokens after the first ``min_tokens`` added (nothing is held back before).

A tokenizer that cleans up tokenization spaces when decoding (``clean_up_tokenization_spaces``: BERT-style
WordPiece ones; on transformers 4.x also Llama 3's and other BPE ones whose config sets it) removes the space before
``.``, ``?``, ``'s``, ``n't``..., so a later token can rewrite text already decoded (``it '`` becomes ``it's``):
the text is also decoded without the clean-up, and what of its clean-up later text could still change
(:func:`cleaned_up`) is held back.

A raw continuation (``qlora generate`` without a chat format, ``/v1/completions``) is decoded after ``context``, the
prompt's last tokens (:func:`prompt_context`), and only the text after theirs is the reply's, as vLLM's detokenizer
primes itself with the prompt: SentencePiece-style decoders (Llama 2, Mistral) drop the word-start space of the
first token of what they decode, so the reply's first word would lose the space that belongs to it (``is`` +
``Paris``); decoded after its prompt, it reads `` Paris``, and the prompt and its continuation join to the text
the tokens spell.

``turn_ends`` (a chat format's turn end spelt as text, :mod:`qlora.infer.turn_end`) end the reply as stop
strings do, but stand for the end-of-turn token the vocabulary lacks, not for a user's stop: ``include_stop``
keeps one only where it keeps such a token, a special one, in vLLM: with ``skip_special_tokens=False``.
"""

from __future__ import annotations

import re
import weakref
from typing import Iterable, Sequence

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# transformers' ``clean_up_tokenization``: these replacements, in this order
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_BYTE_IDS: "weakref.WeakKeyDictionary[object, frozenset[int]]" = weakref.WeakKeyDictionary()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's ``<0xNN>`` byte-fallback tokens (none for byte-level BPE); cached per tokenizer."""
    try:
        return _BYTE_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = frozenset(i for t, i in tokenizer.get_vocab().items() if len(t) == 6 and _BYTE_TOKEN.fullmatch(t))
    try:
        _BYTE_IDS[tokenizer] = ids
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return ids


def cleaned_up(raw: str) -> tuple[str, int]:
    """transformers' ``clean_up_tokenization`` of ``raw``, and how many of its first characters no text after
    ``raw`` can change.

    Each step is ``str.replace``, a left-to-right scan: a match that ends within the settled part of the text given
    to the step is found whatever follows; from the first place where a match could begin and reach past it (the
    settled text from there on begins the pattern) on, the step's output may still change.
    """
    text, settled = raw, len(raw)
    for old, new in _CLEAN_UP:
        head, at = [], 0
        while (found := text.find(old, at)) >= 0 and found + len(old) <= settled:
            head += [text[at:found], new]
            at = found + len(old)
        cut = next((j for j in range(max(at, settled - len(old) + 1), settled) if old.startswith(text[j:settled])),
                   settled)
        head.append(text[at:cut])
        settled = len("".join(head))
        text = "".join(head) + text[cut:].replace(old, new)
    return text, settled


CONTEXT_TOKENS = (4, 24)  # the fewest and most prompt tokens a continuation is decoded after, as vLLM takes them


def prompt_context(tokenizer, prompt_ids: Sequence[int]) -> tuple[int, ...]:
    """The prompt tokens a continuation of ``prompt_ids`` is decoded after: vLLM's choice, the shortest suffix of
    4 to 24 tokens (the whole prompt if shorter) that decodes to whole characters, else the last 4; a trailing run
    of byte tokens (and special tokens, which decoding may drop from within such a run) is left out, so that a
    reply's first bytes never join the prompt's run and turn its characters into U+FFFD."""
    ids = list(prompt_ids)
    ends = byte_token_ids(tokenizer) | frozenset(tokenizer.all_special_ids)
    while ids and ids[-1] in ends:
        ids.pop()
    least, most = CONTEXT_TOKENS
    for n in range(min(least, len(ids)), min(most, len(ids)) + 1):
        if "\ufffd" not in tokenizer.decode(ids[len(ids) - n:], skip_special_tokens=True):
            return tuple(ids[len(ids) - n:])
    return tuple(ids[len(ids) - least:])


def held_suffix(text: str, strings: Iterable[str]) -> int:
    """Length of the longest suffix of ``text`` that begins one of ``strings`` without being all of it: text that
    may still grow into a stop string or a marker, which streaming holds back."""
    longest = 0
    for s in strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if s.startswith(text[len(text) - n:]):
                longest = n
                break
    return longest


class TextStream:
    """Turn one reply's token ids into text pieces, honouring stop strings."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), keep: frozenset[int] = frozenset(),
                 skip_special_tokens: bool = True, include_stop: bool = False, min_tokens: int = 0,
                 spaces_between_special_tokens: bool = True, turn_ends: Sequence[str] = (),
                 context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(dict.fromkeys(s for s in (*stop_strings, *turn_ends) if s))
        # the stop strings a match keeps in the text: the user's with include_stop, a turn end as a special token
        self.kept = frozenset((*stop_strings, *(() if skip_special_tokens else turn_ends)) if include_stop else ())
        self.byte_ids = byte_token_ids(tokenizer)
        self.cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.unsettled = 0  # characters at the end of the last text its clean-up may still change
        self.keep = keep if skip_special_tokens else frozenset()
        self.skip_special = skip_special_tokens
        specials = frozenset(tokenizer.all_special_ids) | {  # and those added as special: decode drops them too
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        self.hidden = specials - keep if self.keep else frozenset()
        # tokens the decoded text leaves out, so a byte run before them goes on after them
        self.dropped = self.hidden if self.keep else specials if skip_special_tokens else frozenset()
        # slow tokenizers only (fast ones, and vLLM's fast path, ignore it): passed when not the default
        self.decode_options = {} if spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        self.context = list(context)  # prompt tokens decoded before the reply, whose text is not the reply's
        self.context_text = self._decode(self.context) if self.context else ""
        self.tokens: list[int] = []
        self.visible: int | None = None  # tokens whose text is shown (None: all; the stop token that ended it: not)
        self.shown = 0  # characters of the decoded text already released
        self.stopped = False  # a stop string matched; nothing more will be released

    def push(self, token: int) -> str:
        """Add one token; return the text that became safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._text(self._stable_end())
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[:len(text) - max(self._held_back(text), self.unsettled)])

    def end(self, token: int) -> str:
        """The stop token that ended the reply: counted, its text shown only with ``include_stop`` (as
        vLLM), then the rest of the reply (:meth:`flush`)."""
        if self.include_stop:
            return self.push(token) + self.flush()
        if not self.stopped:
            self.visible = len(self.tokens)
        self.tokens.append(token)
        return self.flush()

    def flush(self) -> str:
        """The rest of the reply, at its end (held-back text included, up to a stop string in it)."""
        if self.stopped:
            return ""
        text = self._text(len(self.tokens))
        cut = self._stop_at(text)
        self.stopped = cut is not None
        return self._release(text if cut is None else text[:cut])

    def _stable_end(self) -> int:
        """How many tokens decode to text that later tokens cannot change: all but a trailing byte run (and the
        tokens decoding leaves out among and after its bytes)."""
        end = len(self.tokens)
        while end and (self.tokens[end - 1] in self.byte_ids or self.tokens[end - 1] in self.dropped):
            end -= 1
        return end

    def _text(self, end: int) -> str:
        """The reply's text from its first ``end`` tokens: decoded after the context, less the context's text."""
        tokens = self.context + self.tokens[:end if self.visible is None else min(end, self.visible)]
        whole = self._decode(tokens)
        text = whole[len(self.context_text):]
        if self.cleans_up:
            raw = self._decode(tokens, clean_up_tokenization_spaces=False)
            cleaned, settled = cleaned_up(raw)
            if whole == raw != cleaned:  # the decode does not clean up (transformers 5's BPE ignores the setting)
                self.cleans_up, self.unsettled = False, 0
            else:  # 0: a clean-up of its own
                self.unsettled = min(len(whole) - settled, len(text)) if whole == cleaned else 0
        return text

    def _decode(self, tokens: list[int], **options) -> str:
        if not self.keep:
            return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special, **self.decode_options,
                                         **options)
        return self.tokenizer.decode([t for t in tokens if t not in self.hidden], skip_special_tokens=False,
                                     **self.decode_options, **options)

    def _release(self, text: str) -> str:
        piece = text[self.shown:]
        self.shown = max(self.shown, len(text))
        return piece

    def _stop_at(self, text: str) -> int | None:
        """Where the text ends at the earliest stop string in the unreleased text (before it, or after one
        ``include_stop`` keeps), if any; none within the first ``min_tokens`` tokens."""
        if len(self.tokens) <= self.min_tokens:
            return None
        hits = [(i, i + len(s) if s in self.kept else i) for s in self.stop_strings
                if (i := text.find(s, max(0, self.shown - len(s) + 1))) >= 0]
        return min(hits)[1] if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string (none before ``min_tokens``
        tokens: no stop string is looked for there)."""
        if len(self.tokens) < self.min_tokens:
            return 0
        return held_suffix(text, self.stop_strings)
