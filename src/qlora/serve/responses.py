"""OpenAI's Responses API (``POST /v1/responses``) as a view of the chat route.

A Responses request is translated into the equivalent chat request
(:meth:`ResponsesRequest.chat_request`): ``instructions`` becomes the system message, ``input``
items become chat messages (``function_call`` items an assistant turn's ``tool_calls``,
``function_call_output`` items tool messages; ``reasoning`` items, which clients sending ``store: false`` return,
are accepted and dropped: the chat messages qlora renders carry no earlier reasoning, so the template never sees
it; ``item_reference`` items are resolved to the stored items they name before this), flat function tools the
chat template's ``{"type": "function", "function": {...}}``, ``tool_choice`` and ``text.format`` the chat
route's ``tool_choice`` and ``response_format``. The chat route then renders, constrains and
decodes it; errors it raises are renamed to the Responses fields they came from
(:meth:`ResponsesRequest.renamed`). :class:`ResponseWriter` writes the reply as a
``response`` object and as the SSE events the ``openai`` client's stream helper accumulates. A reply's reasoning
(the chat route's ``reasoning`` field: a reasoning model's thinking, read apart from its answer) is a ``reasoning``
output item before the message, its text a ``reasoning_text`` content part, as vLLM writes an open model's
reasoning (OpenAI's own models show only summaries).

A response is kept (``store``, on by default, in :class:`qlora.serve.response_store.ResponseStore`)
with its whole conversation, so ``previous_response_id`` continues it; ``conversation`` names a
kept conversation (:mod:`qlora.serve.conversations`) whose items come before the input instead (the
two exclude each other, as on OpenAI's platform); ``truncation: "auto"`` drops the oldest turns of a
conversation too long for the context. ``background: true`` (which needs ``store``) runs the request
as :mod:`qlora.serve.background` describes. ``include`` takes OpenAI's values (only
``message.output_text.logprobs`` adds anything here); the reads of kept items (a response, its input
items, a conversation's items) show logprobs only when their own ``include`` asks, as OpenAI's do.
Stored ``prompt`` templates are a 400 saying to send the whole input. Only function tools exist here (built-in tools such as web_search run on OpenAI's
platform): any other tool type is a 400.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Callable, Union

from pydantic import Field

from ..infer.logprobs import TokenLogprob, TokenPieces
from .logprobs import chat_logprobs
from .protocol import TEXT_PARTS, APIError, ChatCompletionRequest, ChatMessage, _Body, sse

LOGPROBS = "message.output_text.logprobs"
# the values OpenAI's ``include`` takes; only LOGPROBS adds anything here (the others name items of built-in
# tools, image inputs or reasoning, which qlora never makes, so there is nothing of theirs to add)
INCLUDABLE = ("code_interpreter_call.outputs", "computer_call_output.output.image_url", "file_search_call.results",
              "message.input_image.image_url", LOGPROBS, "reasoning.encrypted_content",
              "web_search_call.action.sources", "web_search_call.results")
FINISHED = ("completed", "incomplete")  # the states whose output continues a conversation


class ResponsesRequest(_Body):
    """The body of ``POST /v1/responses`` (sampling extras such as ``seed`` or ``top_k`` as in chat)."""

    OPENAI_UNUSED = ("access_programs", "background_options", "context_management", "image", "max_tool_calls",
                     "moderation", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning",
                     "safety_identifier", "service_tier")  # max_tool_calls and image: of built-in tools

    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    previous_response_id: str | None = None
    conversation: Union[str, dict[str, Any], None] = None
    background: bool = False
    prompt: dict[str, Any] | None = None
    store: bool | None = None
    truncation: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def refuse_unsupported(self) -> None:
        """400 for stored prompts, combinations OpenAI refuses, or fields of the other OpenAI APIs."""
        if self.prompt is not None:
            raise APIError(400, "'prompt' refers to a prompt template stored on OpenAI's platform; qlora serve has no "
                                "stored prompts. Send the whole conversation in 'input' instead (earlier messages, "
                                "function_call and function_call_output items included).", "prompt")
        if self.background and self.store is False:
            raise APIError(400, "Background mode requires 'store': true: a background response is kept so that it "
                                "can be polled (GET /v1/responses/{id}) and cancelled. Leave 'store' out or set it "
                                "to true.", "background", "unsupported_parameter")
        if self.conversation is not None and self.previous_response_id is not None:
            raise APIError(400, "Mutually exclusive parameters: send either 'previous_response_id' or 'conversation', "
                                "not both (a conversation already holds the earlier turns).", "conversation",
                           "mutually_exclusive_parameters")
        self.conversation_id()
        if self.max_tokens is not None:
            raise APIError(400, "'max_tokens' is a Chat Completions parameter; the Responses API's is "
                                "'max_output_tokens'", "max_tokens")
        if self.n != 1:
            raise APIError(400, "The Responses API returns one reply; 'n' must be 1 (send 'n' to "
                                "/v1/chat/completions for several choices)", "n")
        checked_include(self.include or [])
        for name in ("prompt_logprobs", "return_tokens_as_token_ids"):
            if getattr(self, name) is not None:
                raise APIError(400, f"'{name}' is one of vLLM's chat and completions fields; a Responses reply has no "
                                    "place for it (nor has vLLM's). Send the request to /v1/chat/completions", name)
        if self.truncation not in (None, "auto", "disabled"):
            raise APIError(400, f"'truncation' must be 'auto' or 'disabled', got {self.truncation!r}", "truncation")

    def conversation_id(self) -> str | None:
        """The id ``conversation`` names (it is an id, or ``{"id": ...}``)."""
        conversation = self.conversation
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        if self.conversation is not None and not (isinstance(conversation, str) and conversation):
            raise APIError(400, "'conversation' must be a conversation id ('conv_...') or {'id': 'conv_...'}",
                           "conversation")
        return conversation

    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or ()) or self.top_logprobs is not None

    def input_items(self) -> list[dict[str, Any]]:
        """This request's ``input`` as a list of items (a string is one user message)."""
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        if not items:
            raise APIError(400, "'input' is empty; send a string or a list of input items", "input")
        return items

    def conversation_items(self, history: list[dict[str, Any]], own: list[dict[str, Any]] | None = None
                           ) -> list[tuple[str, dict[str, Any]]]:
        """``history`` (the items of the response continued, or of the conversation named) then this
        request's input (``own``: its input items, as :meth:`input_items` or with ids), each item with the
        field it came from."""
        source = "conversation" if self.conversation is not None else "previous_response_id"
        earlier = [(f"{source} (its item {i})", item) for i, item in enumerate(history)]
        own = self.input_items() if own is None else own
        return earlier + [(f"input.{i}", item) for i, item in enumerate(own)]

    def chat_request(self, items: list[tuple[str, dict[str, Any]]]) -> tuple[ChatCompletionRequest, list[str]]:
        """The equivalent chat request, and for each of its messages the Responses field it came from.

        Args:
            items: the conversation's input items (:meth:`conversation_items`, or fewer after truncation),
                each with the field it came from.

        Raises:
            APIError: an input item, content part, tool, ``tool_choice`` or ``text.format`` of a
                form the chat route has no equivalent for, naming it.
        """
        messages, origins = [], []
        if self.instructions:
            messages.append(ChatMessage(role="system", content=self.instructions))
            origins.append("instructions")
        for where, item in items:
            kind = item.get("type", "message" if "role" in item else None)
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "system", "developer", "assistant"):
                    raise APIError(400, f"{where} has role {role!r}; a message's role is 'user', 'system', "
                                        "'developer' or 'assistant' (tool results are function_call_output items)",
                                   f"{where}.role")
                messages.append(ChatMessage(role=role, content=_text(item.get("content"), f"{where}.content")))
                origins.append(where)
            elif kind == "function_call":
                call = _history_call(item, where)
                previous = messages[-1] if messages else None
                if previous is not None and previous.role == "assistant":
                    previous.tool_calls = [*(previous.tool_calls or ()), call]  # one turn: its text and calls
                else:
                    messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
                    origins.append(where)
            elif kind == "function_call_output":
                call_id = item.get("call_id")
                if not isinstance(call_id, str) or not call_id:
                    raise APIError(400, f"{where} (function_call_output) needs 'call_id': the call_id of the "
                                        "function_call it answers", f"{where}.call_id")
                output = item.get("output")
                text = output if isinstance(output, str) else _text(output, f"{where}.output")
                messages.append(ChatMessage(role="tool", content=text, tool_call_id=call_id))
                origins.append(where)
            elif kind == "reasoning":  # an earlier turn's reasoning: no chat message holds it (see above)
                if not isinstance(item.get("summary", []), list):
                    raise APIError(400, f"{where} (reasoning) has a 'summary' that is not a list of summary_text "
                                        "parts; send the reasoning item as the response gave it", f"{where}.summary")
            else:
                raise APIError(400, f"{where} is an input item of type {kind!r}; qlora serve takes 'message', "
                                    "'function_call', 'function_call_output', 'reasoning' and 'item_reference' items "
                                    "(it runs no built-in tools; to continue a response, send its id as "
                                    "'previous_response_id')", f"{where}.type")
        fields = set(_Body.model_fields) - {"max_tokens", "n", "stream", "stream_options"}
        chat = ChatCompletionRequest(
            **self.model_dump(include=fields, exclude_unset=True), messages=messages, max_completion_tokens=self.max_output_tokens,
            tools=self.chat_tools(), tool_choice=self.chat_tool_choice(), parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format(), logprobs=self.logprobs(),
            top_logprobs=self.top_logprobs if self.logprobs() else None)
        return chat, origins

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """Flat function tools as the chat template takes them."""
        if self.tools is None:
            return None
        out = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise APIError(400, f"tools.{i} is a {kind!r} tool; qlora serve runs no built-in tools (web_search, "
                                    "file_search, computer_use, code_interpreter, mcp, ... run on OpenAI's platform): "
                                    "describe it as a function tool {'type': 'function', 'name': ..., 'parameters': "
                                    "{...}} and run it yourself", f"tools.{i}.type")
            if "function" in tool and "name" not in tool:
                raise APIError(400, f"tools.{i} has the Chat Completions shape; the Responses API's function tool is "
                                    "flat: {'type': 'function', 'name': ..., 'description': ..., 'parameters': {...}}",
                               f"tools.{i}.name")
            out.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
        return out

    def chat_tool_choice(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return choice
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(400, f"'tool_choice' must be 'auto', 'none', 'required' or {{'type': 'function', 'name': "
                                f"...}} (qlora serve runs function tools only), got {choice!r}", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as the chat route's ``response_format``."""
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind in ("text", "json_object"):
            return {"type": kind}
        if kind != "json_schema":
            raise APIError(400, f"'text.format' type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "text.format.type")
        if not isinstance(fmt.get("name"), str):
            raise APIError(400, "'text.format' json_schema needs a 'name': {'type': 'json_schema', 'name': ..., "
                                "'schema': {...}, 'strict': ...}", "text.format.name")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}

    def renamed(self, error: APIError, origins: list[str]) -> APIError:
        """``error`` from the chat route, naming the Responses fields instead of the chat ones."""
        def origin(m: re.Match) -> str:
            where = origins[int(m[1])] if int(m[1]) < len(origins) else "input"
            return where + (m[2] or "") if where.startswith("input.") else where

        def field(name: str) -> str:
            name = re.sub(r"^messages\.(\d+)(\.content)?.*$", origin, name)
            name = re.sub(r"^tools\.(\d+)\.function\b", r"tools.\1", name)
            name = re.sub(r"^response_format(\.json_schema)?", "text.format", name)
            return {"messages": "input", "max_completion_tokens": "max_output_tokens"}.get(name, name)
        message = re.sub(r"messages\[(\d+)\]", lambda m: field(f"messages.{m[1]}"), error.message)
        message = message.replace("'max_completion_tokens'", "'max_output_tokens'")
        message = re.sub(r"\b(tools\.\d+\.function(\.\w+)?|response_format(\.json_schema)?(\.\w+)?)\b",
                         lambda m: field(m[1]), message)
        param = field(error.param) if error.param else None
        for source in ("previous_response_id", "conversation"):
            if param is not None and param.startswith(source):
                param = source  # an item of the conversation continued
        return APIError(error.status, message, param, error.code, error.kind)


def checked_include(include: list[str]) -> set[str]:
    """``include`` (of a request body, or the ``include[]`` query parameter of a read) as a set; a 400 in
    OpenAI's words for a value it does not know."""
    for value in include:
        if value not in INCLUDABLE:
            supported = ", ".join(repr(v) for v in INCLUDABLE)
            raise APIError(400, f"Invalid value for 'include': {value!r}. Supported values are: {supported}.",
                           "include", "invalid_value")
    return set(include)


def shown(items: list[dict[str, Any]], include: set[str]) -> list[dict[str, Any]]:
    """Output or input items as a read returns them: their ``output_text`` parts' ``logprobs`` only when
    ``include`` asks for them (``[]`` otherwise, as a response created without them has)."""
    if LOGPROBS in include:
        return items
    out = []
    for item in items:
        content = item.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("logprobs") for p in content):
            item = item | {"content": [p | {"logprobs": []} if isinstance(p, dict) and p.get("logprobs") else p
                                       for p in content]}
        out.append(item)
    return out


def _text(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as the chat route takes it: a string, or a list of chat text parts and, for
    ``input_image`` parts (their ``image_url`` a data: URI), ``image_url`` parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", where)
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise APIError(400, f"{where}.{k} is an input_image without an image_url; send the image as a data: "
                                    "URI in 'image_url' (file_id is not read)", f"{where}.{k}")
            if not url.startswith("data:"):
                raise APIError(400, f"{where}.{k}: image {url[:60]!r}: only data: URIs are read "
                                    "(data:image/png;base64,...); qlora serve fetches no URLs", f"{where}.{k}")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.{k} is a content part of type {kind!r}; send input_text parts ({{'type': "
                                "'input_text', 'text': ...}) and input_image parts", f"{where}.{k}")
        else:
            parts.append({"type": "text", "text": part["text"]})
    return parts


def _history_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``function_call`` input item as a chat tool call (its arguments checked as a JSON object)."""
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise APIError(400, f"{where} (function_call) needs '{key}' as a string: send the call_id, name and "
                                "arguments (a JSON object in a string) of the call the model made", f"{where}.{key}")
    try:
        args = json.loads(item["arguments"]) if item["arguments"].strip() else {}
    except json.JSONDecodeError as exc:
        raise APIError(400, f"{where}.arguments is not valid JSON ({exc.msg} at column {exc.colno}); send the "
                            "arguments the model gave", f"{where}.arguments") from None
    if not isinstance(args, dict):
        raise APIError(400, f"{where}.arguments must be a JSON object", f"{where}.arguments")
    function = {"name": item["name"], "arguments": item["arguments"]}
    return {"id": item["call_id"], "type": "function", "function": function}


class ResponseWriter:
    """A reply as OpenAI's ``response`` object and stream events (numbered in order)."""

    def __init__(self, body: ResponsesRequest, pieces: TokenPieces,
                 keep: Callable[[dict[str, Any]], None] | None = None, sampling: Any = None) -> None:
        self.body, self.pieces, self.keep = body, pieces, keep
        self.sampling = sampling if sampling is not None else body  # what temperature and top_p echo: the used ones
        self.id, self.message_id = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex
        self.reasoning_id = "rs_" + uuid.uuid4().hex
        self.created_at, self.sequence = int(time.time()), 0

    def event(self, kind: str, **fields: Any) -> str:
        """One SSE event, ``event:`` line included, with the next sequence number."""
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(payload, kind)

    def logprobs(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        return chat_logprobs(self.pieces, entries) if self.body.logprobs() else []

    def message(self, text: str, status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The reply's message item; ``logprobs`` in the API's shape (:meth:`logprobs`)."""
        part = self.text_part(text, logprobs)
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": [part]}

    def reasoning(self, text: str, status: str) -> dict[str, Any]:
        """The reply's reasoning item (before its message)."""
        return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": text}] if text else []}

    @staticmethod
    def text_part(text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}

    @staticmethod
    def call(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
        """A chat tool call as a ``function_call`` output item."""
        fn = call["function"]
        return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
                "name": fn["name"], "arguments": fn["arguments"], "status": status}

    @staticmethod
    def status(finish_reason: str | None, calls: list[dict[str, Any]]) -> str:
        """``incomplete`` when the token limit cut a reply that is not a call, else ``completed``."""
        return "incomplete" if finish_reason == "length" and not calls else "completed"

    def output(self, content: str | None, calls: list[dict[str, Any]], finish_reason: str | None,
               logprobs: list[TokenLogprob], reasoning: str = "") -> list[dict[str, Any]]:
        """The output items: the reasoning (if the reply has any), the message (unless the reply only calls),
        then one item per call."""
        status = self.status(finish_reason, calls)
        cut = status == "incomplete" and not content  # the token limit came before the reasoning ended
        items = [self.reasoning(reasoning, status if cut else "completed")] if reasoning else []
        items += [] if content is None else [self.message(content, status, self.logprobs(logprobs))]
        return items + [self.call(c) for c in calls]

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, int] | None = None,
                 error: dict[str, str] | None = None) -> dict[str, Any]:
        """The ``response`` object, echoing the request's settings."""
        body = self.body
        done = int(time.time()) if status == "completed" else None
        text = {"format": (body.text or {}).get("format") or {"type": "text"}}
        conversation = body.conversation_id()
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": done, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": body.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id, "reasoning": None, "store": body.store is not False,
            "background": body.background, "conversation": None if conversation is None else {"id": conversation},
            "temperature": self.sampling.temperature, "text": text,
            "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "top_logprobs": body.top_logprobs,
            "top_p": self.sampling.top_p, "truncation": body.truncation or "disabled", "user": body.user,
            "metadata": body.metadata or {}, "usage": None if usage is None else _usage(usage),
        }

    def failure(self, message: str, code: str, output: list[dict[str, Any]]) -> list[str]:
        """The events ending a stream that failed, as OpenAI's do: ``error`` (``code`` says what happened), then
        ``response.failed`` with the response in status ``failed`` (its ``error`` a ``server_error``) keeping
        ``output``, what was generated before the failure (:func:`partial_output`)."""
        return [self.event("error", code=code, message=message, param=None),
                self.event("response.failed", response=self.state(
                    "failed", output, error={"code": "server_error", "message": message}))]

    def state(self, status: str, output: list[dict[str, Any]], usage: dict[str, int] | None = None,
              error: dict[str, str] | None = None) -> dict[str, Any]:
        """The ``response`` object in a state it passes through (created, in progress, finished), handed
        to ``keep`` (the store, which keeps what it is asked to) first."""
        response = self.response(status, output, usage, error)
        if self.keep is not None:
            self.keep(response)
        return response


class StreamedMessage:
    """The message item of a background response while its text streams: each delta is appended (what came
    before is neither copied nor saved again), and the item is built when a read asks for it."""

    def __init__(self, writer: ResponseWriter) -> None:
        self.writer = writer
        self.pieces: list[str] = []
        self.logprobs: list[dict[str, Any]] = []

    def add(self, piece: str, logprobs: list[dict[str, Any]]) -> None:
        self.pieces.append(piece)
        self.logprobs += logprobs

    def text(self) -> str:
        """The text streamed so far."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]  # the next read joins only what came since
        return self.pieces[0] if self.pieces else ""

    def item(self, status: str = "in_progress") -> dict[str, Any]:
        """The message as it stands (``in_progress`` while it streams; ``incomplete`` once cut)."""
        return self.writer.message(self.text(), status, list(self.logprobs))


def partial_output(streamed: StreamedMessage | None) -> list[dict[str, Any]]:
    """The output of a response cut before its end (cancelled, or failed): the message streamed so far, as
    OpenAI's cancelled and failed responses keep what the model had generated, its status ``incomplete``."""
    return [] if streamed is None else [streamed.item("incomplete")]


def drop_oldest_turn(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]] | None:
    """``items`` without their oldest turn (``truncation: "auto"``): from the first item that is not a
    system or developer message up to the next user message, system and developer messages kept;
    ``None`` when only the last user turn is left."""
    def instruction(item: dict[str, Any]) -> bool:
        return item.get("type", "message") == "message" and item.get("role") in ("system", "developer")

    start = next((k for k, (_, item) in enumerate(items) if not instruction(item)), None)
    if start is None:
        return None
    end = next((k for k in range(start + 1, len(items))
                if items[k][1].get("type", "message") == "message" and items[k][1].get("role") == "user"), None)
    if end is None:
        return None
    return items[:start] + [x for x in items[start:end] if instruction(x[1])] + items[end:]


def _usage(usage: dict[str, int]) -> dict[str, Any]:
    """Chat usage counts as the Responses API's (no prompt cache here; a reasoning item's tokens are counted in
    ``output_tokens``, not apart)."""
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}
