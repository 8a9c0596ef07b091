"""Forced tool calls: decode a reply that is, by construction, one well-formed call.

OpenAI's ``tool_choice: "required"`` (some call) and ``{"type": "function", "function":
{"name": N}}`` (a call to N) are served by constraining decoding to the call markup of
the model's chat template (:mod:`qlora.infer.tool_calls`):

1. the opening markup (with the function's name when it is given) is put in the
   reply's first tokens, prefilled with the prompt when the tokenizer spells it exactly,
   but for its last token, which the model picks among those that fit (token healing:
   ``": "`` then ``{`` is often one token ``" {"`` in training text);
2. with several tools the model picks the name, one character at a time, among the
   offered names only;
3. the arguments are decoded under :class:`~qlora.infer.json_prefix.JsonPrefix`: only
   tokens keeping them the prefix of a JSON object valid under the tool's ``parameters``,
   at every depth (see :mod:`qlora.infer.json_schema` for what is enforced), may be chosen;
   text that would end the markup early (``</tool_call>`` in a string) is refused too;
4. once the object closes, the closing markup is forced, then the end-of-turn token.

So the reply parses to exactly one call, unless the token limit cuts it first, which
the caller reports as ``finish_reason: "length"``. One call per reply: a forced
reply never holds parallel calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .constrained import TokenTexts, choose_token, literal_ids, masked_partial
from .generate import SamplingOptions
from .json_prefix import JsonPrefix
from .json_schema import Node, compile_schema, object_root


class ForcedCallUnsupported(ValueError):
    """The template's call markup is not one a call can be forced into (the message says why)."""


@dataclass(frozen=True)
class CallMarkup:
    """A call as ``opening + NAME + after_name + ARGUMENTS + closing``; ``forbidden``: text the
    arguments may not contain because the parser would read it as the end of the call."""

    opening: str
    after_name: str
    closing: str
    forbidden: tuple[str, ...] = ()


_DS = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>"


def call_markup(format_name: str, template: str) -> CallMarkup:
    """The markup one forced call is written in, for a template whose call format is ``format_name``.

    Raises:
        ForcedCallUnsupported: the format has no JSON-object arguments to constrain, or the template
            renders tools without any call markup qlora knows.
    """
    if format_name == "hermes":
        return CallMarkup('<tool_call>\n{"name": "', '", "arguments": ', "}\n</tool_call>",
                          ("<tool_call>", "</tool_call>"))
    if format_name == "mistral":
        if "[ARGS]" in template:  # tokenizer v11 and later: [TOOL_CALLS]NAME[ARGS]{...}
            return CallMarkup("[TOOL_CALLS]", "[ARGS]", "", ("[TOOL_CALLS]", "[ARGS]"))
        opening = "[TOOL_CALLS] [" if "[TOOL_CALLS] [" in template else "[TOOL_CALLS]["
        return CallMarkup(opening + '{"name": "', '", "arguments": ', "}]", ("[TOOL_CALLS]",))
    if format_name == "deepseek-v3":
        return CallMarkup(_DS, "\n```json\n", "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
                          ("```", "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"))
    if format_name == "json":
        if '"parameters": ' not in template:
            raise ForcedCallUnsupported(
                "the chat template renders tools but shows no call markup qlora knows (hermes <tool_call>, "
                "Mistral [TOOL_CALLS], DeepSeek, GLM, or Llama 3.1's {\"name\": ..., \"parameters\": ...}), so "
                "there is no well-defined text to force a call into")
        return CallMarkup('{"name": "', '", "parameters": ', "}")
    if format_name == "glm-4.5":
        raise ForcedCallUnsupported(
            "GLM-4.5 writes a call's arguments as <arg_key>/<arg_value> pairs of raw text, not as a JSON object, "
            "so decoding cannot be constrained to valid JSON arguments")
    raise ForcedCallUnsupported(f"the tool-call format {format_name!r} has no forced-call markup")


_OPEN, _NAME, _ARGS, _CLOSE, _END = range(5)


class CallMatcher:
    """Immutable state of the text of one forced call read so far (:meth:`feed` gives a new one or None)."""

    __slots__ = ("markup", "choices", "stage", "pos", "literal", "args", "tail")

    def __init__(self, markup: CallMarkup, choices: Mapping[str, Node], stage: int, pos: int, literal: str,
                 args: JsonPrefix | None, tail: str) -> None:
        self.markup, self.choices, self.stage, self.pos, self.literal = markup, choices, stage, pos, literal
        self.args, self.tail = args, tail

    @classmethod
    def start(cls, markup: CallMarkup, schemas: Mapping[str, Node], name: str | None = None) -> "CallMatcher":
        """Before the opening markup; ``name`` forces that function, else one of ``schemas``' names is written."""
        if name is not None:
            return cls(markup, {name + markup.after_name: schemas[name]}, _OPEN, 0,
                       markup.opening + name + markup.after_name, None, "")
        choices = {n + markup.after_name: s for n, s in schemas.items()}
        return cls(markup, choices, _OPEN, 0, markup.opening, None, "")

    @property
    def done(self) -> bool:
        """The whole call is written: only the end of the turn may follow."""
        return self.stage == _END

    def literal_left(self) -> str:
        """The rest of the markup that must come next ("" outside fixed markup)."""
        return self.literal[self.pos:] if self.stage in (_OPEN, _CLOSE) else ""

    def feed(self, text: str) -> "CallMatcher | None":
        stage, pos, literal, args, tail = self.stage, self.pos, self.literal, self.args, self.tail
        i = 0
        while i < len(text):
            if stage == _OPEN or stage == _CLOSE:
                n = min(len(literal) - pos, len(text) - i)
                if text[i:i + n] != literal[pos:pos + n]:
                    return None
                i, pos = i + n, pos + n
                if pos == len(literal):
                    if stage == _CLOSE:
                        stage = _END
                    elif len(self.choices) == 1 and literal.endswith(next(iter(self.choices))):
                        stage, args = _ARGS, JsonPrefix.start(next(iter(self.choices.values())))
                    else:
                        stage, pos, literal = _NAME, 0, ""
            elif stage == _NAME:
                literal += text[i]
                i += 1
                if not any(c.startswith(literal) for c in self.choices):
                    return None
                if literal in self.choices:
                    stage, args = _ARGS, JsonPrefix.start(self.choices[literal])
            elif stage == _ARGS:
                piece = text[i:]
                fed = args.feed(piece)
                if fed is None:  # maybe the object closes inside the piece: read it character by character
                    j = 0
                    while j < len(piece) and not args.complete:
                        args = args.feed(piece[j])
                        if args is None:
                            return None
                        j += 1
                    if not args.complete:
                        return None
                    piece = piece[:j]
                else:
                    args = fed
                if self.markup.forbidden:
                    window = tail + piece
                    if any(f in window for f in self.markup.forbidden):
                        return None
                    tail = window[-max(map(len, self.markup.forbidden)):]
                i += len(piece)
                if args.complete:
                    stage, pos, literal = (_CLOSE, 0, self.markup.closing) if self.markup.closing else (_END, 0, "")
            else:
                return None  # _END: only the end-of-turn token may follow
        return CallMatcher(self.markup, self.choices, stage, pos, literal, args, tail)

    def admits(self, low: int, high: int) -> bool:
        """Whether some character in ``low..high`` (what a partial UTF-8 character may become) may come next."""
        if self.stage == _OPEN or self.stage == _CLOSE:
            return self.pos < len(self.literal) and low <= ord(self.literal[self.pos]) <= high
        if self.stage == _NAME:
            n = len(self.literal)
            return any(len(c) > n and c.startswith(self.literal) and low <= ord(c[n]) <= high for c in self.choices)
        return self.stage == _ARGS and self.args.admits(low, high)  # type: ignore[union-attr]


def tool_arguments(parameters: Mapping | None) -> Node:
    """The compiled schema of a tool's arguments: its ``parameters``, narrowed to objects (none: any object).

    Raises:
        SchemaError: no JSON object satisfies ``parameters``.
    """
    return object_root(compile_schema(parameters if parameters is not None else {"type": "object"}).root)


class ForcedCall:
    """The per-request constraint the batcher asks for each token of a forced call.

    Args:
        tokenizer: the served tokenizer.
        markup: the template's call markup (:func:`call_markup`).
        tools: the request's OpenAI function tools.
        name: the function to call; None: any of ``tools`` (``tool_choice: "required"``).
        keep: special tokens kept in the reply's text (the markup's own).
        stop_ids: end-of-turn tokens; the best-scored one ends the reply once the call is written.
    """

    def __init__(self, tokenizer, markup: CallMarkup, tools: Sequence[dict], name: str | None,
                 keep: frozenset[int], stop_ids: frozenset[int]) -> None:
        schemas = {t["function"]["name"]: tool_arguments(t["function"].get("parameters"))
                   for t in tools if name is None or t["function"]["name"] == name}
        self.tokenizer, self.keep, self.stop_ids = tokenizer, keep, sorted(stop_ids)
        self.texts = TokenTexts.of(tokenizer)
        self.matcher = CallMatcher.start(markup, schemas, name)
        # All but the opening's last token: that one may merge with what follows (' {' after '": '),
        # so the model picks it among the tokens that fit, as it saw the markup tokenized in training.
        self.prefix_ids: list[int] = (literal_ids(tokenizer, self.matcher.literal_left(), keep) or [])[:-1]
        if self.prefix_ids:
            spelled = "".join(self.texts.text(t, keep) for t in self.prefix_ids)  # type: ignore[misc]
            self.matcher = self.matcher.feed(spelled)  # type: ignore[assignment]
        self._spelled: dict[str, list[int]] = {}
        self.pending = b""  # a partial character's bytes

    @property
    def complete(self) -> bool:
        """Whether the whole call is written (the reply may end here)."""
        return self.matcher.done

    def choose(self, logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
               allows: Callable[[int], bool] | None = None) -> int | None:
        """The next token of the call among those ``allows`` allows (None: no token of the vocabulary continues it)."""
        if self.matcher.done:
            stops = [t for t in self.stop_ids if t < logits.numel() and (allows is None or allows(t))]
            return max(stops, key=lambda t: float(logits[t])) if stops else None
        token = choose_token(masked_partial(logits, self.texts, self.pending), options, generator,
                             self.accepts if allows is None else lambda t: allows(t) and self.accepts(t),
                             () if self.pending else self._preferred())
        if token is not None:
            self.matcher, self.pending = self._advance(token)  # type: ignore[misc]
        return token

    def _advance(self, token: int) -> tuple[CallMatcher, bytes] | None:
        return self.texts.advance(token, self.pending, self.matcher.feed, CallMatcher.admits, self.keep)

    def accepts(self, token: int) -> bool:
        """Whether ``token`` may come next."""
        if token in self.stop_ids:
            return self.matcher.done
        text = None if self.pending else self.texts.text(token, self.keep)
        if text:  # the common case first, without byte arithmetic: a token of whole characters
            return self.matcher.feed(text) is not None
        return self._advance(token) is not None

    def _preferred(self) -> list[int]:
        """Fixed markup is written as the tokenizer spells it (as in training), not as the logits would,
        but for its last token, which may merge with what follows."""
        left = self.matcher.literal_left()
        if not left:
            return []
        if left not in self._spelled:
            ids = literal_ids(self.tokenizer, left, self.keep) or []
            self._spelled[left] = ids[:1] if len(ids) > 1 else []
        return self._spelled[left]
