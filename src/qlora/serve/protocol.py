"""The OpenAI request bodies ``qlora serve`` accepts, and its error shape.

Fields follow the OpenAI API reference. A field unknown to the route is a 400 naming
it and the closest known one, as OpenAI answers ("Unrecognized request argument
supplied"), so a typo (``temprature``) is not silently ignored. Known are qlora's
own fields, vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty`` and those of
:mod:`qlora.serve.vllm_extras`) and every field the OpenAI API defines for the route:
those that change nothing here (``user``, ``metadata``, ``store``, ``service_tier``,
prompt-cache keys, reasoning hints, ...) are accepted without effect (each class's
``OPENAI_UNUSED``); those that would change the answer in a way qlora does not
implement (``suffix``, ``best_of`` > 1, audio output, web search) are refused with a
400 naming the field.

vLLM's other extra fields (``min_tokens``, ``ignore_eos``, ``stop_token_ids``, guided decoding,
``chat_template_kwargs``, ...) are served as vLLM defines them, or refused: see
:mod:`qlora.serve.vllm_extras`.

Sampling: ``temperature``, ``top_p``, ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2],
over the tokens the choice generated), ``logit_bias`` (token id as a string -> bias in [-100, 100];
an id outside the tokenizer's vocabulary is a 400 naming it), and vLLM's extra body fields
``top_k`` (0 or -1: off), ``min_p`` and ``repetition_penalty`` (over prompt and reply, as
transformers; left out: the model's generation_config value). Penalties and bias apply to greedy decoding
too; see :mod:`qlora.infer.penalties`. As vLLM's defaults: ``temperature``, ``top_p``, ``top_k``, ``min_p`` left
out of a request take the values the model's generation_config sets, and a request without a token limit
(``max_tokens``/``max_completion_tokens``) stops at its ``max_new_tokens`` where it sets one
(:func:`qlora.infer.sampling_options.model_defaults`).
An out-of-range value is a 400 naming the parameter, as is a value of the wrong JSON type (``"5"`` for an integer,
``"0.5"`` for a number, ``"true"`` or ``1`` for a boolean, ``5.0`` for an integer): OpenAI's "Invalid type" answer,
never a silent coercion.

``n``: that many choices, each its own batch row sampled with its own generator; with
``seed``, choice 0 is seeded with it (so it equals the ``n=1`` reply) and choice ``j``
with a seed derived from it and ``j``. ``/v1/completions`` takes a batch of prompts
(strings or token-id lists, as lm-evaluation-harness sends); choice ``i * n + j`` is
prompt ``i``'s ``j``-th.

``logprobs`` (chat: ``logprobs: true`` with ``top_logprobs`` 0..20; completions:
``logprobs`` 0..20) are ``log_softmax`` of the model's raw logits, before penalties, bias,
temperature, top-p or a constraint (OpenAI's numbers, vLLM's default ``raw_logprobs``): see
:mod:`qlora.infer.logprobs`. Completions' ``top_logprobs`` also hold the chosen token
(up to ``logprobs + 1`` entries, as OpenAI documents); ``text_offset`` counts characters
of the choice's ``text`` over the tokens' own texts (a SentencePiece text's first token keeps
its word-start space there, though decoding drops it from ``text``). End-of-turn/EOS tokens, which add no text, get no entry.
``echo: true`` puts the prompt before the reply, and with ``logprobs`` its tokens' entries
first (the first token's logprob is null); ``max_tokens: 0`` scores the prompt only.

``response_format``: ``json_object`` (the reply is a JSON object) or ``json_schema``
(a JSON document valid under the schema), decoded under a constraint
(:mod:`qlora.infer.json_reply`) that follows the whole schema, at every depth: the
subset OpenAI's Structured Outputs documents (``type`` and type lists, ``properties``,
``required``, ``additionalProperties``, ``items``, ``prefixItems``, ``minItems``/``maxItems``,
``minLength``/``maxLength``, ``enum``/``const``, ``anyOf``, ``$ref`` into ``$defs`` or
``definitions`` or ``#``, recursion included), plus ``oneOf`` whose alternatives exclude each
other and ``allOf`` of one schema; :mod:`qlora.infer.json_schema` has the details. With
``strict: true`` a schema asking for what cannot be enforced exactly (``uniqueItems``,
``not``, another ``format``, a ``oneOf`` whose alternatives may both hold, ...) is a 400
naming each such keyword by path, since the promise could not be kept; without it those
keywords are ignored (the rest still holds). A schema no finite value satisfies (a
``$ref`` cycle without content, a required property that may not appear, ...) is a 400.

``tool_choice``: 'auto' (default with tools: the model decides, its reply is parsed
for calls), 'none' (tools shown, reply returned as text), 'required' (the reply is
one call to one of the tools) and ``{"type": "function", "function": {"name": N}}``
(one call to N, which must be among ``tools``). The last two are decoded under a
constraint (:mod:`qlora.infer.forced_call`): the arguments are a JSON object valid under
the tool's ``parameters``, enforced as ``response_format``'s schemas are (a tool with
``strict: true`` asking for what is not enforced is a 400, as is one no object satisfies);
one call per reply, whatever ``parallel_tool_calls`` says; a template whose call markup
cannot be forced gets a 400.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..infer.forced_call import tool_arguments
from ..infer.json_schema import Node, SchemaError, compile_schema, unenforced_keywords
from ..errors import UsageError
from ..chat.content_parts import PART_SEPARATOR
from ..infer.messages import IMAGE_PLACEHOLDER, Message
from ..infer.tool_calls import tool_definition_problem
from ..template_kwargs import render_parameter


_ENFORCED = ("It enforces, at every depth, type, properties, required, additionalProperties, items, prefixItems, "
             "minItems, maxItems, minLength, maxLength, pattern (ECMA-262 without lookaround or backreferences), "
             "format (date, time, date-time, duration, uuid, ipv4, ipv6, hostname, email), minimum, maximum, "
             "exclusiveMinimum, exclusiveMaximum (draft 4's booleans too), multipleOf, enum, const, anyOf, oneOf of "
             "exclusive alternatives, allOf of one schema and local $ref (recursion included), pattern, format and "
             "the length bounds together; uniqueItems, not and the rest are not.")
TEXT_PARTS = ("text", "input_text", "output_text")  # content parts read as text: chat's and the Responses API's
MAX_STOP_STRINGS = 32  # OpenAI takes 4; eval harnesses send their task's stops plus EOS, often more


def sse(payload: dict[str, Any], event: str | None = None) -> str:
    """One server-sent event carrying ``payload`` as compact JSON (with an ``event:`` line when named)."""
    data = f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
    return f"event: {event}\n{data}" if event else data


class APIError(Exception):
    """An OpenAI-shaped error: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any) -> tuple[str, bool] | None:
    """Where ``value`` first holds a lone surrogate: the dotted path of the string, or of the object one of whose keys
    holds it (then True: the key itself cannot be written back in an answer); None if nowhere. Read without
    recursion: a body may nest deeper than Python recurses."""
    stack = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path, False
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        inner = []
        for key, sub in pairs:
            if isinstance(key, str) and _SURROGATE.search(key):
                return path, True
            inner.append((f"{path}.{key}" if path else str(key), sub))
        stack.extend(reversed(inner))
    return None


class KnownFields(BaseModel):
    """A request body whose unknown fields are a 400 naming them (checked once the known ones are valid)."""

    # strict: a value of the wrong JSON type ("5" for an integer, "true" for a boolean, 1 for a boolean) is a 400
    # naming the field, as OpenAI answers, not silently coerced; an integer is still a number
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    OPENAI_UNUSED: ClassVar[tuple[str, ...]] = ()  # the OpenAI API's fields of the route that change nothing here

    @classmethod
    def known_fields(cls) -> set[str]:
        return set(cls.model_fields) | set(cls.OPENAI_UNUSED)

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        """JSON may escape half of a UTF-16 pair (``"\\ud83d"``), which no UTF-8 text holds, so no tokenizer takes it:
        a 400 naming the field, not the tokenizer's 500."""
        found = _lone_surrogate(data)
        if found is not None:
            path, key = found
            where = (f"A key of '{path}'" if path else "A key of the body") if key else f"'{path}'"
            raise APIError(400, f"{where} holds a lone UTF-16 surrogate (an escape such as \\ud83d without its other "
                                "half), which is not a character: send the whole pair, or the character as UTF-8",
                           path or None)
        return data

    @model_validator(mode="after")
    def _refuse_unknown(self) -> "KnownFields":
        unknown = [name for name in self.model_extra or () if name not in self.OPENAI_UNUSED]
        if not unknown:
            return self
        shown = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(self.known_fields()), n=1, cutoff=0.6)
            shown.append(f"{name} (did you mean {close[0]!r}?)" if close else name)
        plural = "s" if len(unknown) > 1 else ""
        # not a ValueError: pydantic lets it through, and the app answers it as the 400 it is
        raise APIError(400, f"Unrecognized request argument{plural} supplied: {', '.join(shown)}", unknown[0])


# OpenAI's (include_obfuscation: no obfuscation field is ever sent) and vLLM's continuous_usage_stats
STREAM_OPTIONS = ("include_usage", "include_obfuscation", "continuous_usage_stats")


class _Body(KnownFields):
    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI clients send ``null`` for options left unset: take the default (an unknown field stays, to be
        refused)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=128)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    top_k: int = Field(default=0, ge=-1)  # vLLM's extra sampling fields (the openai client's extra_body)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)  # None: the model's generation_config value
    # vLLM's other extra fields, served as it defines them (qlora.serve.vllm_extras)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # refused: no grammar engine
    structured_outputs: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=-1)  # chat and completions only (not Responses)
    return_tokens_as_token_ids: bool | None = None  # chat and completions only (not Responses)
    request_id: str | None = None
    priority: int = 0  # one first-come queue: 0 only, as vLLM's default scheduler
    use_beam_search: bool = False  # refused when true
    length_penalty: float = 1.0  # beam search's only: changes nothing here

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Body":
        """``stream_options`` shape a stream only: sent without one it is a 400 (vLLM's answer), not dropped."""
        if self.stream_options and not self.stream:
            raise APIError(400, "'stream_options' is only allowed when 'stream' is true; send 'stream': true, or "
                                "the request without 'stream_options'", "stream_options")
        for key, value in (self.stream_options or {}).items():
            param = f"stream_options.{key}"
            if key not in STREAM_OPTIONS:
                raise APIError(400, f"Unrecognized request argument supplied: {param}", param)
            if value is not None and not isinstance(value, bool):
                raise APIError(400, f"'{param}' must be true or false, got {value!r}", param)
        return self

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop")
        if "" in stop:  # it would end every reply before its first token; vLLM's 400
            raise APIError(400, "'stop' cannot contain an empty string; leave it out", "stop")
        return tuple(stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def continuous_usage(self) -> bool:
        """vLLM's ``continuous_usage_stats`` (with ``include_usage``): every chunk carries the usage so far."""
        return self.include_usage() and bool(self.stream_options.get("continuous_usage_stats"))

    def token_bias(self, vocab_size: int) -> dict[int, float]:
        """``logit_bias`` with token-id keys, checked against a vocabulary of ``vocab_size`` ids.

        Raises:
            APIError: a key that is not a token id of the vocabulary, or a bias outside [-100, 100].
        """
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            try:
                token = int(key)
            except ValueError:
                token = -1
            if not 0 <= token < vocab_size:
                raise APIError(400, f"'logit_bias' key {key!r} is not a token id of this model's vocabulary (integers "
                                    f"0 to {vocab_size - 1})", f"logit_bias.{key}")
            if not -100 <= value <= 100:
                raise APIError(400, f"'logit_bias' value of token {key} must be in [-100, 100], got {value}",
                               f"logit_bias.{key}")
            bias[token] = value
        return bias


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None  # OpenAI's participant name: to the template, as vLLM and transformers pass it
    reasoning: str | None = None  # an assistant message's reasoning, as vLLM returns it (and its older name)
    reasoning_content: str | None = None

    def message(self, index: int) -> Message:
        """The message as the chat template takes it (tool-call arguments parsed from their JSON text)."""
        where = f"messages.{index}"
        if self.tool_calls and self.role != "assistant":
            raise APIError(400, f"{where} is a {self.role} message with 'tool_calls'; only assistant messages "
                                "call tools", f"{where}.tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise APIError(400, f"{where} is a tool message without 'tool_call_id'; give the id of the call it "
                                "answers (from the assistant message's tool_calls)", f"{where}.tool_call_id")
        if self.content is None and self.role != "assistant":  # OpenAI's 400; only an assistant may say nothing
            if "content" in self.model_fields_set:
                raise APIError(400, f"Invalid type for '{where}.content': expected a string or an array of content "
                                    f"parts, but got null instead. A {self.role} message needs its text.",
                               f"{where}.content")
            raise APIError(400, f"Missing required parameter: '{where}.content'. A {self.role} message needs its "
                                "text: a string or an array of content parts.", f"{where}.content")
        calls = tuple(_history_call(call, f"{where}.tool_calls.{k}") for k, call in enumerate(self.tool_calls or ()))
        role = "system" if self.role == "developer" else self.role
        pieces, images = self._pieces(index)
        text = _joined(pieces)
        # a tool's text parts are one string for every template, as vLLM joins them
        parts = tuple(pieces) if isinstance(self.content, list) and role != "tool" else ()
        if images and role != "user":
            raise APIError(400, f"{where} is a {self.role} message with images; images go in user messages",
                           f"{where}.content")
        try:
            return Message(role, text, calls, self.tool_call_id if self.role == "tool" else None, images=images,
                           reasoning=(self.reasoning or self.reasoning_content or "") if role == "assistant" else "",
                           name=self.name, parts=parts)
        except UsageError as exc:  # more or fewer <image> written in its text than images
            raise APIError(400, f"{where}: {exc}", f"{where}.content") from None

    def text(self, index: int) -> tuple[str, tuple]:
        """The message's text (its parts' texts joined with newlines, as vLLM joins them for a template reading a
        string) and its images (``image_url`` parts holding data: URIs, at ``<image>`` marks in the text)."""
        pieces, images = self._pieces(index)
        return _joined(pieces), images

    def _pieces(self, index: int) -> tuple[list[str], tuple]:
        """The texts of the message's parts (an image's the ``<image>`` placeholder) and its images. Text parts are
        OpenAI's ``text`` (and the Responses API's ``input_text``/``output_text``, which vLLM reads as text too); an
        assistant's ``refusal`` part is its text, as vLLM renders it. Other parts are refused."""
        if not isinstance(self.content, list):
            return [self.content or ""], ()
        pieces, images = [], []
        for k, part in enumerate(self.content):
            where = f"messages.{index}.content.{k}"
            kind = part.get("type")
            key = "refusal" if kind == "refusal" and self.role == "assistant" else "text" if kind in TEXT_PARTS \
                else None
            if kind == "image_url":
                value = part.get("image_url")
                url = value.get("url") if isinstance(value, dict) else value
                images.append(_data_image(url, where))
                pieces.append(IMAGE_PLACEHOLDER)
            elif key is None:
                raise APIError(400, f"messages[{index}] has a content part of type {kind!r}; only text parts "
                                    "({'type': 'text', 'text': ...}), image_url parts and, in assistant messages, "
                                    "refusal parts are supported", f"messages.{index}.content")
            elif not isinstance(part.get(key), str):
                raise APIError(400, f"Missing required parameter: '{where}.{key}' (a {kind!r} part's text, as a "
                                    "string)", f"{where}.{key}")
            else:
                pieces.append(part[key])
        return pieces, tuple(images)


def _joined(pieces: list[str]) -> str:
    """Part texts as one string: a newline between two texts (vLLM's join), none beside an image's placeholder."""
    out = ""
    for k, piece in enumerate(pieces):
        if k and piece != IMAGE_PLACEHOLDER and pieces[k - 1] != IMAGE_PLACEHOLDER:
            out += PART_SEPARATOR
        out += piece
    return out


def _data_image(url: Any, where: str):
    """The image of an ``image_url`` part: a base64 ``data:`` URI, checked; URLs are refused (nothing is fetched)."""
    from ..chat.images import resolve_image

    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] if isinstance(url, str) else type(url).__name__
        raise APIError(400, f"{where}: image {shown!r}: only data: URIs are read (data:image/png;base64,...); qlora "
                            "serve fetches no URLs. Send the image's bytes base64-encoded in a data: URI.",
                       f"{where}.image_url.url")
    try:
        return resolve_image(url, where)
    except UsageError as exc:
        raise APIError(400, str(exc), f"{where}.image_url.url") from None


def _history_call(call: Any, where: str) -> dict[str, Any]:
    """An earlier assistant message's tool call, checked, with its arguments as a dict (what templates render)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or call.get("type", "function") != "function":
        raise APIError(400, f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                            "'arguments': '<JSON object>'}}", where)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{where}.function.arguments is not valid JSON ({exc.msg} at column {exc.colno}); "
                                "send the arguments the model gave, as a JSON object in a string",
                           f"{where}.function.arguments") from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


class ChatCompletionRequest(_Body):
    OPENAI_UNUSED = ("metadata", "moderation", "prediction", "prompt_cache_key", "prompt_cache_options",
                     "prompt_cache_retention", "reasoning_effort", "safety_identifier", "service_tier", "store", "user",
                     "verbosity")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None  # OpenAI's deprecated form of tools: refused, not silently ignored
    function_call: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None  # OpenAI's audio output: refused, as are its web search tool's options
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    # vLLM's chat-template fields (the template's own variables, and how the prompt ends)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, Any]] | None = None
    echo: bool = False
    chat_template: str | None = None  # served only with --trust-request-chat-template, as in vLLM
    add_special_tokens: bool = False  # the tokenizer's BOS etc. on top of what the template writes

    def template_options(self, server: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the chat template is rendered with beyond messages and tools: ``chat_template_kwargs`` as
        ``apply_chat_template(**kwargs)`` takes them, merged over ``server`` (``--default-chat-template-kwargs``);
        their ``add_generation_prompt``, ``continue_final_message`` and ``documents`` override the top-level
        fields, as in vLLM.

        Raises:
            APIError: a key naming another of ``apply_chat_template``'s parameters, or both
                ``add_generation_prompt`` and ``continue_final_message``.
        """
        key = render_parameter(self.chat_template_kwargs or {})
        if key == "chat_template":
            raise APIError(400, "'chat_template_kwargs' key 'chat_template': send the template as the "
                                "top-level 'chat_template' field instead", "chat_template_kwargs.chat_template")
        if key is not None:
            raise APIError(400, f"'chat_template_kwargs' key {key!r} is a parameter of the rendering, not a "
                                "template variable; send 'tools' and 'messages' as top-level fields, and leave "
                                "the others out", f"chat_template_kwargs.{key}")
        kwargs = {**(server or {}), **(self.chat_template_kwargs or {})}
        options = {"add_generation_prompt": self.add_generation_prompt,
                   "continue_final_message": self.continue_final_message, "documents": self.documents, **kwargs}
        if options["add_generation_prompt"] and options["continue_final_message"]:
            raise APIError(400, "'continue_final_message' continues the last message, 'add_generation_prompt' starts "
                                "a new one: send 'add_generation_prompt': false with it", "continue_final_message")
        if options["continue_final_message"] and self.messages[-1].role == "tool":
            raise APIError(400, "'continue_final_message' continues the last message, which is a tool result",
                           "continue_final_message")
        return options

    def reply_role(self, options: dict[str, Any]) -> str:
        """The reply's role under the request's :meth:`template_options`: the assistant's, or with
        ``add_generation_prompt: false`` the last message's (vLLM's; ``echo`` repeats the last message when it has
        this role)."""
        return "assistant" if options["add_generation_prompt"] else self.messages[-1].role

    def function_tools(self) -> list[dict[str, Any]]:
        """The request's tools, checked: function tools with a valid name and a JSON-schema object."""
        problem = tool_definition_problem(self.tools or ())
        if problem is not None:
            raise APIError(400, *problem)
        return list(self.tools or ())

    def forced_function(self) -> str | None:
        """The function a reply must call: its name for a named ``tool_choice``, ``""`` for
        'required' (any of the tools), None when the model decides ('auto', the default) or calls
        nothing ('none').

        Raises:
            APIError: ``tool_choice`` without tools, of an unknown form, or naming a function not in ``tools``.
        """
        choice = self.tool_choice
        if choice is not None and not self.tools:
            raise APIError(400, "'tool_choice' is only allowed when 'tools' are given", "tool_choice")
        if choice is None or choice in ("auto", "none"):
            return None
        if choice == "required":
            return ""
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(choice, dict) or choice.get("type", "function") != "function" or not isinstance(name, str):
            raise APIError(400, f"'tool_choice' must be 'auto', 'none', 'required' or "
                                f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")
        offered = [t["function"]["name"] for t in self.function_tools()]
        if name not in offered:
            raise APIError(400, f"'tool_choice' names the function {name!r}, which is not among the request's "
                                f"tools ({', '.join(offered)}); name one of them, or send that function in 'tools'",
                           "tool_choice")
        return name

    def check_forced_schemas(self) -> None:
        """400 for a forced call's tool whose ``parameters`` cannot be decoded under: no object satisfies
        them, or the tool is ``strict`` and asks for what is not enforced."""
        forced = self.forced_function()
        if forced is None:
            return
        for i, tool in enumerate(self.function_tools()):
            fn = tool["function"]
            if forced and fn["name"] != forced:
                continue
            where = f"tools.{i}.function.parameters"
            try:
                tool_arguments(fn.get("parameters"))
            except SchemaError as exc:
                raise APIError(400, f"{where} of the function {fn['name']!r} cannot be followed: {exc}; fix the "
                                    "schema", where) from None
            missing = unenforced_keywords(fn.get("parameters", {}))
            if missing and fn.get("strict"):
                raise APIError(400, f"the function {fn['name']!r} is strict, but qlora serve cannot enforce these "
                                    f"parts of its parameters: {', '.join(missing)}. {_ENFORCED} Send 'strict': "
                                    "false to have them unchecked (the rest still holds)", where)

    def calls_tools(self) -> bool:
        """Whether the reply is read for tool calls: tools given and ``tool_choice`` not 'none'."""
        return bool(self.tools) and self.tool_choice != "none"

    def refuse_unsupported(self) -> None:
        """400 for options that would change the answer in ways not implemented."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if set(self.modalities or ()) - {"text"}:
            raise APIError(400, f"'modalities' {self.modalities}: qlora serve answers in text only; send ['text'] or "
                                "leave 'modalities' out", "modalities")
        if self.audio is not None:
            raise APIError(400, "'audio' sets the voice of an audio reply; qlora serve answers in text only", "audio")
        if self.web_search_options is not None:
            raise APIError(400, "'web_search_options' configures OpenAI's web search; qlora serve searches nothing "
                                "(give the model function tools instead)", "web_search_options")
        for legacy, now in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, legacy) is not None:
                raise APIError(400, f"'{legacy}' is OpenAI's deprecated form of '{now}'; send '{now}' instead "
                                    "(function tools: {'type': 'function', 'function': {...}})", legacy)
        self.function_tools()
        self.check_forced_schemas()
        self.json_reply()

    def logprob_count(self) -> int | None:
        """Alternatives per token when logprobs are asked (0: the chosen token's only), else None."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def json_reply(self) -> tuple[Node | None, bool] | None:
        """What ``response_format`` asks: None (text), or (the compiled schema the reply follows, None for
        any value; without one, whether the value must be an object).

        Raises:
            APIError: an unknown format, a malformed ``json_schema``, a schema no value satisfies, a
                ``strict`` schema asking for what is not enforced, or a JSON format with tools the model
                may call.
        """
        fmt = self.response_format or {"type": "text"}
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind not in ("json_object", "json_schema"):
            raise APIError(400, f"'response_format' type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "response_format.type")
        if self.calls_tools():
            raise APIError(400, "'response_format' (a JSON reply) cannot be combined with 'tools' the model may call "
                                "(a call is not the JSON reply); send 'tool_choice': 'none' or leave 'tools' out",
                           "response_format")
        if kind == "json_object":
            return None, True
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(400, "'response_format' json_schema must be {'name': ..., 'schema': {...}, 'strict': ...}",
                           "response_format.json_schema")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise APIError(400, f"'response_format.json_schema.strict' must be true or false, got {spec['strict']!r}",
                           "response_format.json_schema.strict")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise APIError(400, "'response_format.json_schema.schema' must be a JSON Schema object",
                           "response_format.json_schema.schema")
        try:
            compiled = compile_schema(schema)
        except SchemaError as exc:
            raise APIError(400, f"'response_format' json_schema {spec['name']!r} cannot be followed: {exc}; fix the "
                                "schema", "response_format.json_schema.schema") from None
        if compiled.unenforced and spec.get("strict"):
            raise APIError(400, f"'response_format' json_schema {spec['name']!r} is strict, but qlora serve cannot "
                                f"enforce these parts of its schema: {', '.join(compiled.unenforced)}. {_ENFORCED} "
                                "Send 'strict': false to have them unchecked (the rest still holds)",
                           "response_format.json_schema.schema")
        return compiled.root, False

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Body):
    OPENAI_UNUSED = ("user",)

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=0)  # the OpenAI default; 0: score the prompt (with echo)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: False tokenizes a text prompt without BOS etc.

    def refuse_unsupported(self) -> None:
        """400 for options that would change the answer in ways not implemented."""
        if self.suffix:
            raise APIError(400, "'suffix' is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, f"'best_of' must be 1, got {self.best_of}", "best_of")
        if isinstance(self.prompt, list) and not self.prompt:  # "" is a prompt: BOS alone, where the tokenizer adds one
            raise APIError(400, "'prompt' is empty", "prompt")
        if self.max_tokens == 0 and self.stream:
            raise APIError(400, "'max_tokens': 0 (scoring the prompt) cannot be streamed", "max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def logprob_count(self) -> int | None:
        return self.logprobs

    def token_limit(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(KnownFields):
    """vLLM's ``POST /tokenize``: a ``prompt`` tokenized as ``/v1/completions`` tokenizes it, or ``messages``
    rendered and tokenized as ``/v1/chat/completions`` does (its template fields too); ``model`` left out: the
    base's."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = None
    documents: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "Send either 'prompt' (a text) or 'messages' (a chat), one of them", "prompt")
        return self

    def chat(self, model: str) -> ChatCompletionRequest:
        """The chat request whose prompt this one asks for."""
        fields = {"messages", "add_generation_prompt", "continue_final_message", "chat_template",
                  "chat_template_kwargs", "tools", "documents"}
        return ChatCompletionRequest(model=model, add_special_tokens=bool(self.add_special_tokens),
                                     **self.model_dump(include=fields, exclude_unset=True))


class DetokenizeRequest(KnownFields):
    """vLLM's ``POST /detokenize``: token ids back to their text."""

    model: str | None = None
    tokens: list[int]
