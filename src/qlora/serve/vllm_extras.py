"""vLLM's extra request fields (the ``openai`` client's ``extra_body``), as vLLM defines them.

Clients written for vLLM or SGLang send these beside OpenAI's fields; those qlora can honour
exactly are served with their vLLM meaning, the rest refused with a 400 saying why (never
silently ignored). Sampling and decoding (all routes): ``min_tokens`` (the stop tokens cannot
be chosen, and stop strings are not looked for, until that many tokens were generated),
``ignore_eos`` (EOS and end-of-turn tokens do not end the reply), ``stop_token_ids`` (more
tokens that end it), ``skip_special_tokens``, ``include_stop_str_in_output`` (the stop string
or stop token stays in the text; a chat turn end spelt as text only with ``skip_special_tokens`` off, as the
end-of-turn token it stands for), ``spaces_between_special_tokens`` (slow tokenizers only, as
in transformers and vLLM), ``truncate_prompt_tokens`` (only the prompt's last k tokens; -1: the
context length). Constrained decoding: ``guided_json``, ``guided_regex``, ``guided_choice`` and
``structured_outputs`` (``json``, ``regex``, ``choice``, ``json_object``), on qlora's JSON Schema
and regex automata; a schema or pattern asking for what they do not enforce is a 400, since the
promise could not be kept. Masked tokens (all routes, :mod:`qlora.infer.token_filter`):
``allowed_token_ids`` and ``bad_words``, with guided decoding too, not with a forced tool call (its
markup is written by fixed tokens). Chat and completions only: ``prompt_logprobs`` (0 to 20
alternatives; not streamed, as vLLM refuses) and ``return_tokens_as_token_ids``; ``add_special_tokens``
and, for chat, ``chat_template`` (used instead of the model's or the adapter's, only when the server
trusts request templates, as vLLM's ``--trust-request-chat-template``). ``request_id`` names the
reply (``chatcmpl-<request_id>``), as in vLLM. Accepted without effect: ``priority`` 0 (one
first-come queue, vLLM's default scheduler, which refuses other priorities as this does) and ``length_penalty`` (beam search only). Refused:
``use_beam_search``, grammars (``guided_grammar``, ``structured_outputs.grammar`` and
``structural_tag``: no grammar engine), and the JSON whitespace options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..infer.batcher import Constraint
from ..infer.json_schema import Node, SchemaError, compile_schema
from ..infer.regex import PatternError, Regex
from ..infer.regex_reply import choice_pattern
from ..infer.token_filter import TokenFilter, bad_word_ids
from .protocol import APIError, _Body

_STRUCTURED_KINDS = ("json", "regex", "choice", "json_object")
_STRUCTURED_OFF = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")  # must be unset
_GRAMMARS = ("grammar", "structural_tag")
MAX_PROMPT_LOGPROBS = 20  # vLLM's default --max-logprobs


@dataclass(frozen=True)
class Guide:
    """A guided reply: a JSON value (``schema``, None: any; ``root_object``), or a match of ``regex``."""

    param: str
    schema: Node | None = None
    root_object: bool = False
    regex: Regex | None = None


def check_extras(body: _Body, context_length: int) -> Guide | None:
    """The guided decoding the request asks for (:func:`guide`), once its vLLM extras are checked: a 400
    for those qlora cannot honour, or values vLLM itself refuses."""
    if body.use_beam_search:
        raise APIError(400, "'use_beam_search': qlora serve has no beam search (each choice is sampled or greedy); "
                            "send 'use_beam_search': false or leave it out", "use_beam_search")
    if body.priority != 0:
        raise APIError(400, f"'priority' {body.priority}: qlora serve schedules requests first come, first served "
                            "(as vLLM's default scheduler, which refuses priorities too); send 'priority': 0 or "
                            "leave it out", "priority")
    if body.guided_grammar is not None:
        raise APIError(400, "'guided_grammar': qlora serve has no grammar engine; it constrains replies to a JSON "
                            "schema ('guided_json', response_format) or a regular expression ('guided_regex')",
                       "guided_grammar")
    limit = body.token_limit()
    if body.min_tokens and limit is not None and body.min_tokens > limit:
        raise APIError(400, f"'min_tokens' ({body.min_tokens}) must be at most the token limit ({limit})",
                       "min_tokens")
    if body.truncate_prompt_tokens is not None:
        if body.truncate_prompt_tokens == 0 or body.truncate_prompt_tokens > context_length:
            raise APIError(400, f"'truncate_prompt_tokens' must be -1 (the context length) or 1 to the context length "
                                f"({context_length}), got {body.truncate_prompt_tokens}", "truncate_prompt_tokens")
    wanted = body.prompt_logprobs
    if wanted is not None and not 0 <= wanted <= MAX_PROMPT_LOGPROBS:
        raise APIError(400, f"'prompt_logprobs' {wanted}: qlora serve gives 0 to {MAX_PROMPT_LOGPROBS} alternatives "
                            "per prompt token (vLLM's default --max-logprobs; -1, the whole vocabulary, is refused "
                            "there too)", "prompt_logprobs")
    if wanted and body.stream:
        raise APIError(400, "'prompt_logprobs' are not available when 'stream' is true (as in vLLM); send the "
                            "request without 'stream'", "prompt_logprobs")
    return guide(body)


def token_filter(body: _Body, tokenizer) -> TokenFilter | None:
    """The tokens ``allowed_token_ids`` and ``bad_words`` mask, or None.

    Raises:
        APIError: an empty ``allowed_token_ids`` or an id outside the vocabulary; an empty bad word, one
            that tokenizes to nothing, or too many.
    """
    allowed = body.allowed_token_ids
    if allowed is not None:
        if not allowed:
            raise APIError(400, "'allowed_token_ids' is empty: no token could be chosen; send at least one token id "
                                "or leave it out", "allowed_token_ids")
        for k, token in enumerate(allowed):
            if not 0 <= token < len(tokenizer):
                raise APIError(400, f"'allowed_token_ids' {token} is not a token id of this model's vocabulary (0 to "
                                    f"{len(tokenizer) - 1})", f"allowed_token_ids.{k}")
    try:
        banned = bad_word_ids(tokenizer, body.bad_words or ())
    except ValueError as exc:
        raise APIError(400, f"'bad_words': {exc}", "bad_words") from None
    if allowed is None and not banned:
        return None
    mask = TokenFilter(allowed, banned)
    if mask.allowed is not None and mask.allowed <= mask.always:
        raise APIError(400, "'bad_words' mask every token 'allowed_token_ids' allow: no token could be chosen; "
                            "allow another token or leave one of the two out", "bad_words")
    return mask


def refuse_dead_start(constraint: Constraint | None, masked: TokenFilter | None, what: str, vocab_size: int) -> None:
    """A 400 when no token may begin ``constraint``'s reply (``what`` names the request field asking for it): none
    of ``allowed_token_ids`` (less those ``bad_words`` mask), or none of the vocabulary (no token spells its first
    character, whole or in bytes: a tokenizer without byte fallback lacking it). Known before decoding, so not a
    reply cut at its first token; where this shows later, the reply ends there (the batcher's ``"stop"`` when it is
    whole, else ``"length"``)."""
    if constraint is None or constraint.complete:
        return
    tokens = range(vocab_size) if masked is None or masked.allowed is None else masked.allowed
    if any((masked is None or masked.allows(t, ())) and constraint.accepts(t) for t in tokens):
        return
    if masked is not None and masked.allowed is not None:
        banned = " not masked by 'bad_words'" if masked.always or masked.after else ""
        raise APIError(400, f"'allowed_token_ids' hold no token{banned} that can begin the reply '{what}' asks for, "
                            "so no reply could be written: allow a token it may start with, or send the request "
                            "without one of the two", "allowed_token_ids")
    raise APIError(400, f"No token of this model's vocabulary can begin the reply '{what}' asks for: no token "
                        "spells its first character, whole or as UTF-8 bytes (the tokenizer has no byte fallback for "
                        "it)" + (", or 'bad_words' mask the tokens that would" if masked is not None else "")
                   + "; ask for text that starts with characters the vocabulary can write", what)


def stop_ids(body: _Body, defaults: frozenset[int], vocab_size: int) -> frozenset[int]:
    """The tokens that end the reply: EOS and end-of-turn (unless ``ignore_eos``) and ``stop_token_ids``."""
    for k, token in enumerate(body.stop_token_ids or ()):
        if not 0 <= token < vocab_size:
            raise APIError(400, f"'stop_token_ids' {token} is not a token id of this model's vocabulary (0 to "
                                f"{vocab_size - 1})", f"stop_token_ids.{k}")
    return (frozenset() if body.ignore_eos else defaults) | frozenset(body.stop_token_ids or ())


def truncated(body: _Body, prompt_ids: list[int], context_length: int) -> list[int]:
    """The prompt's last ``truncate_prompt_tokens`` tokens (-1: the context length), or all of them."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return prompt_ids
    keep = context_length if keep == -1 else keep
    return prompt_ids[-keep:]


def guide(body: _Body) -> Guide | None:
    """The constraint the guided fields ask for (at most one kind), or None.

    Raises:
        APIError: several kinds, a schema or pattern that cannot be followed exactly, an unknown or
            unsupported ``structured_outputs`` key.
    """
    asked: list[tuple[str, str, Any]] = []  # (param, kind, value)
    for kind in ("json", "regex", "choice"):
        value = getattr(body, f"guided_{kind}")
        if value is not None:
            asked.append((f"guided_{kind}", kind, value))
    if body.structured_outputs is not None:
        asked += _structured(body.structured_outputs)
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"Only one kind of guided decoding per request; got {', '.join(a[0] for a in asked)}",
                       asked[1][0])
    param, kind, value = asked[0]
    if kind == "json_object":
        return Guide(param, None, True) if value else None
    if kind == "json":
        return Guide(param, _schema(param, value))
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise APIError(400, f"'{param}' must be a non-empty list of strings", param)
        value = choice_pattern(value)
    elif not isinstance(value, str):
        raise APIError(400, f"'{param}' must be a regular expression (a string)", param)
    try:
        return Guide(param, regex=Regex(value, anchored=True))
    except PatternError as exc:
        raise APIError(400, f"'{param}' cannot be enforced: {exc}. Patterns are enforced in the subset Python's re "
                            "and ECMA-262 agree on (no lookaround, backreferences, \\b or \\p{...})", param) from None


def _structured(spec: Any) -> list[tuple[str, str, Any]]:
    if not isinstance(spec, dict):
        raise APIError(400, "'structured_outputs' must be an object such as {'json': {...}}, {'regex': ...} or "
                            "{'choice': [...]}", "structured_outputs")
    for key, value in spec.items():
        param = f"structured_outputs.{key}"
        if key in _GRAMMARS and value is not None:
            raise APIError(400, f"'{param}': qlora serve has no grammar engine; it constrains replies to a JSON "
                                "schema ('json') or a regular expression ('regex', 'choice')", param)
        if key in _STRUCTURED_OFF and value:
            raise APIError(400, f"'{param}' is not supported: the JSON constraint allows the whitespace and "
                                "properties the schema does; leave it out", param)
        if key not in _STRUCTURED_KINDS + _STRUCTURED_OFF + _GRAMMARS + ("disable_fallback", "_backend"):
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param)
    return [(f"structured_outputs.{k}", k, spec[k]) for k in _STRUCTURED_KINDS
            if spec.get(k) is not None and spec.get(k) is not False]


def _schema(param: str, value: Any) -> Node:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"'{param}' is not valid JSON ({exc.msg} at column {exc.colno})", param) from None
    if not isinstance(value, dict):
        raise APIError(400, f"'{param}' must be a JSON Schema object", param)
    try:
        compiled = compile_schema(value)
    except SchemaError as exc:
        raise APIError(400, f"'{param}' cannot be followed: {exc}; fix the schema", param) from None
    if compiled.unenforced:
        raise APIError(400, f"'{param}' asks for what qlora serve cannot enforce: {', '.join(compiled.unenforced)}. "
                            "Guided decoding promises a reply valid under the whole schema; send it as "
                            "response_format json_schema with 'strict': false to have those parts unchecked",
                       param)
    return compiled.root
