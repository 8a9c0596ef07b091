"""A chat format's end of turn as a stop string, where no token of the vocabulary ends the turn.

ChatML trained on a base vocabulary without an ``<|im_end|>`` token (Llama 2, Mistral, Gemma) spells its
turn end in ordinary pieces, and training follows the last answer's text turn end with an EOS
(:mod:`qlora.chat.tokenize`): the model writes ``answer<|im_end|>\\n`` and then EOS, or runs on into
a turn of its own, and no stop token ends the reply at the turn end. Chat-mode inference stops at that
text as at a ``stop`` string, so a reply ends where its turn does and never shows the marker.

The text is the template's own: what it renders after an assistant message, up to where a following turn
begins (the part the last turn and one inside the conversation share), stripped of whitespace. A turn that
ends in a stop token (Llama 3's ``<|eot_id|>``, ChatML with ``<|im_end|>`` in the vocabulary, Alpaca's EOS)
needs no stop string and gets none; nor does one ending in another token of the vocabulary's markup (special
and added tokens), which the model writes as one token and the reply's text leaves out, so no stop string
could match it: the model's ``generation_config`` names such tokens as stops (Gemma 4's ``<turn|>``). Nor does
an end without a letter or a markup character (``<``, ``[``, ``#``): a custom template's ``.``, ``!``, ``---`` or
``。`` shows up inside ordinary answers, and stopping there would cut them short; the EOS training put after the
turn end still ends the reply.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Collection, Sequence

from qlora.chat.common_ends import common_prefix
from qlora.chat.tokenize import markup_ids
from qlora.model.chat_format import ChatFormat

from .messages import Message
from .template import render_chat

# Options that shape the prompt's end rather than the conversation's turns: the probe renders finished turns.
_PROMPT_END_OPTIONS = ("add_generation_prompt", "continue_final_message")
_SENTINEL = "qlora-turn-end-probe"
_MARKUP = "<[#"  # the characters turn markers are spelt with (<|im_end|>, [/INST], ### End) beside letters
_PROBE = (Message("user", "Hello"), Message("assistant", _SENTINEL))


def turn_end_stops(tokenizer, stop_ids: Collection[int], chat_format: ChatFormat | None = None,
                   template_kwargs: dict[str, Any] | None = None,
                   tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, ...]:
    """The stop strings that end a reply at its turn end: the format's turn-end text, or none.

    Args:
        tokenizer: the model's tokenizer.
        stop_ids: the ids that end a chat reply (:func:`~qlora.infer.template.stop_token_ids`).
        chat_format, template_kwargs, tools: as the prompt is rendered with (:func:`render_chat`).

    Returns:
        ``(text,)`` when the assistant turn ends in ordinary text; ``()`` when a stop token ends the last turn, the
        turn end holds a markup token, it has no letter nor ``<``, ``[``, ``#`` (whitespace, punctuation), or the
        template cannot render the probe.
    """
    options = {k: v for k, v in (template_kwargs or {}).items() if k not in _PROMPT_END_OPTIONS}

    def rendered(messages: Sequence[Message]) -> str:
        return render_chat(tokenizer, messages, add_generation_prompt=False, chat_format=chat_format, tools=tools,
                           template_kwargs=options)

    try:
        last = rendered(_PROBE)
    except Exception:  # noqa: BLE001 - a template that refuses this probe: the prompt's own rendering reports it
        return ()
    end = last.rfind(_SENTINEL) + len(_SENTINEL)
    if end < len(_SENTINEL):
        return ()
    tail = last[end:]  # what the model is trained to write after its last answer (an EOS follows unless it stops)
    try:
        inside = rendered([*_PROBE, Message("user", "Bye")])
    except Exception:  # noqa: BLE001 - a template that takes no turn after this one: the last turn's end is all
        inside = ""
    if inside[:end] == last[:end]:
        tail = tail[:common_prefix(tail, inside[end:])]
    text = tail.strip()
    tokens = {*stop_ids, *markup_ids(tokenizer)}
    if (not _marks_a_turn(text) or _holds(tokenizer, last[end:], set(stop_ids))
            or _holds(tokenizer, text, tokens)):
        return ()
    return (text,)


class TurnEnds:
    """:func:`turn_end_stops` of one tokenizer and its stop ids, computed once per chat format, template variables
    and whether tools are given, then reused: a server asks for every chat request, and the probe's two template
    renders would each time give what they gave the last request of that format (the tool definitions shape the
    prompt's start, not how an assistant turn ends). The ``capacity`` most recently asked are kept."""

    def __init__(self, tokenizer, stop_ids: Collection[int], capacity: int = 64) -> None:
        self.tokenizer, self.stop_ids, self.capacity = tokenizer, frozenset(stop_ids), capacity
        self._known: OrderedDict[tuple, tuple[str, ...]] = OrderedDict()

    def __call__(self, chat_format: ChatFormat | None = None, template_kwargs: dict[str, Any] | None = None,
                 tools: Sequence[dict[str, Any]] | None = None) -> tuple[str, ...]:
        """:func:`turn_end_stops` for these (computed at the first such call)."""
        options = {k: v for k, v in (template_kwargs or {}).items() if k not in _PROMPT_END_OPTIONS}
        key = (chat_format, json.dumps(options, sort_keys=True, default=repr), bool(tools))
        if key in self._known:
            self._known.move_to_end(key)
            return self._known[key]
        stops = turn_end_stops(self.tokenizer, self.stop_ids, chat_format, options, tools)
        self._known[key] = stops
        if len(self._known) > self.capacity:
            self._known.popitem(last=False)
        return stops


def _marks_a_turn(text: str) -> bool:
    """Whether ``text`` holds a letter or a markup character: punctuation alone (or nothing) is common inside
    answers, so it cannot tell their end."""
    return any(c.isalpha() or c in _MARKUP for c in text)


def _holds(tokenizer, text: str, tokens: Collection[int]) -> bool:
    """Whether ``text`` tokenizes with one of ``tokens`` among its ids."""
    return any(t in tokens for t in tokenizer(text, add_special_tokens=False)["input_ids"])
