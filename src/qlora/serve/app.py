"""The OpenAI-compatible HTTP API of ``qlora serve``, as a FastAPI application.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET
/v1/models`` (the base model and each adapter, by id), plus ``GET /health``
(no key needed) and ``GET /stats`` (the batcher's counters). The request's
``model`` picks the adapter; every request becomes one row of the shared
:class:`qlora.infer.batcher.ContinuousBatcher`, so concurrent requests for
different adapters are decoded in the same batch. Errors are OpenAI-shaped JSON
(:class:`qlora.serve.protocol.APIError`); a streaming client that disconnects
has its row dropped at the next step.

Function calling: ``tools`` go to the chat template, and the reply is parsed for
calls in the markup that template uses (:mod:`qlora.infer.tool_calls`); calls
come back as ``message.tool_calls`` with ``finish_reason: "tool_calls"``. A
stream holds text back from where call markup may begin and sends the calls, whole,
when the reply ends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..infer.batcher import ContinuousBatcher, Event
from ..infer.batcher import Request as Generation
from ..infer.forced_call import CallMarkup, ForcedCall, ForcedCallUnsupported, call_markup
from ..infer.generate import SamplingOptions, default_stop_ids, encode_prompt
from ..infer.template import chat_template, render_chat, renders_tools, stop_token_ids
from ..infer.tool_calls import ToolCall, ToolCallFormat, ToolCallStream, markup_token_ids, tool_call_format
from ..model.chat_format import ChatFormat
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, _Body

TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def build_app(batcher: ContinuousBatcher, base_id: str, adapters: list[str], api_key: str | None = None,
              chat_formats: dict[str | None, ChatFormat | None] | None = None) -> FastAPI:
    """The application serving ``batcher``'s model as ``base_id`` and each adapter as its name.

    Args:
        batcher: a started batcher; its model holds the adapters by these names.
        base_id: model id of the base alone.
        adapters: adapter names, served as model ids.
        api_key: when set, every request but ``GET /health`` needs ``Authorization: Bearer <api_key>``.
        chat_formats: adapter name (``None``: the base) -> the chat format its chat requests are rendered
            with (the one it was trained with); missing or ``None``: the tokenizer's own template.
    """
    chat_formats = chat_formats or {}
    model, tokenizer = batcher.model, batcher.tokenizer
    chat_stops = frozenset(stop_token_ids(model, tokenizer))
    text_stops = frozenset(default_stop_ids(model, tokenizer))
    ids = {base_id: None, **{name: name for name in adapters}}
    created = int(time.time())
    app = FastAPI(title="qlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:  # logged by the server too
        error = APIError(500, f"Internal error: {type(exc).__name__}: {exc}", kind="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).body(), status_code=400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return batcher.load()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": mid, "object": "model", "created": created, "owned_by": "qlora",
                 "root": base_id, "parent": None if adapter is None else base_id}
                for mid, adapter in ids.items()]
        return {"object": "list", "data": data}

    tool_templates: dict[str | None, bool] = {}  # adapter -> whether its template renders tools

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.refuse_unsupported()
        adapter = _adapter(ids, body.model)
        chat_format = chat_formats.get(adapter)
        messages = [m.message(i) for i, m in enumerate(body.messages)]
        tools, plan, markup, forced = body.function_tools(), None, None, None
        if tools:
            if adapter not in tool_templates:
                tool_templates[adapter] = renders_tools(tokenizer, chat_format)
            if not tool_templates[adapter]:
                origin = chat_format.origin if chat_format is not None else "the tokenizer's chat_template"
                raise APIError(400, f"The chat template of {body.model!r} ({origin}) does not render tools, so the "
                                    "model would never see them: 'tools' cannot be served for it. Serve a model whose "
                                    "chat template renders tools (one trained on tool-calling data with its own "
                                    "template), or send the request without 'tools'.", "tools")
            if body.calls_tools():
                template = chat_template(tokenizer, chat_format, tools=True) or ""
                fmt, forced = tool_call_format(template), body.forced_function()
                plan = _ToolPlan(fmt, tuple(t["function"]["name"] for t in tools),
                                 body.parallel_tool_calls and forced is None)
                markup = _forced_markup(fmt, template, body) if forced is not None else None
        try:
            prompt = render_chat(tokenizer, messages, chat_format=chat_format, tools=tools)
        except Exception as exc:  # e.g. a template that allows no system turn, or needs alternating roles
            raise APIError(400, f"The model's chat template rejected these messages: {exc}", "messages") from None
        prompt_ids = _encode(model, tokenizer, prompt)
        generation = _generation(batcher, body, adapter, prompt_ids, chat_stops, "messages")
        if plan is not None:
            generation.keep_tokens = markup_token_ids(plan.format, tokenizer)
        if markup is not None:  # a forced call: no stop strings inside it, one call, its end forced
            generation.stop_strings = ()
            generation.constraint = ForcedCall(tokenizer, markup, tools, forced or None, generation.keep_tokens,
                                               chat_stops)
        return await _respond(batcher, generation, body, request, chat=True, tools=plan)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        adapter = _adapter(ids, body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and isinstance(
            body.prompt[0], str) else body.prompt
        if isinstance(prompt, str):
            prompt_ids = _encode(model, tokenizer, prompt)
        elif all(0 <= t < len(tokenizer) for t in prompt):
            prompt_ids = list(prompt)
        else:
            raise APIError(400, f"'prompt' token ids must lie in [0, {len(tokenizer)})", "prompt")
        generation = _generation(batcher, body, adapter, prompt_ids, text_stops, "prompt")
        return await _respond(batcher, generation, body, request, chat=False)

    return app


def _forced_markup(fmt: ToolCallFormat, template: str, body: ChatCompletionRequest) -> CallMarkup:
    try:
        return call_markup(fmt.name, template)
    except ForcedCallUnsupported as exc:
        raise APIError(400, f"'tool_choice' {body.tool_choice!r} cannot be served for {body.model!r}: {exc}. Send "
                            "'tool_choice': 'auto' (the model decides whether to call) instead.",
                       "tool_choice") from None


@dataclass(frozen=True)
class _ToolPlan:
    """How a chat reply is read for tool calls: the template's markup, the offered names, one call or several."""

    format: ToolCallFormat
    names: tuple[str, ...]
    parallel: bool

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The reply's content (None when it only calls) and its calls in OpenAI's shape."""
        content, calls = self.format.parse(text, self.names)
        if not calls:
            return text, []
        return content.strip() or None, self.shape(calls)

    def shape(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Calls as ``message.tool_calls`` entries (only the first when parallel calls are off)."""
        calls = calls if self.parallel else calls[:1]
        return [{"id": self.format.new_id(), "type": "function",
                 "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


class _RequireKey:
    """ASGI middleware: every request but ``/health`` needs ``Authorization: Bearer <key>``.

    Checked before anything else (a bad body without a key gets 401, not 400).
    """

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the "
                                      "key given to qlora serve (--api-key or QLORA_API_KEY).", code="invalid_api_key")
                await JSONResponse(error.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json")
    # drop "body" and the union-member tags pydantic adds ("str", "list[int]", ...)
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (
        isinstance(p, int) or not (p in TYPE_TAGS or "[" in p))]
    param = ".".join(loc) or None
    return APIError(400, f"Invalid request body: {param or 'body'}: {first.get('msg', 'invalid')}", param)


def _adapter(ids: dict[str, str | None], model_id: str) -> str | None:
    if model_id not in ids:
        raise APIError(400, f"The model {model_id!r} does not exist; this server has {', '.join(ids)} "
                            "(see GET /v1/models).", "model", "model_not_found")
    return ids[model_id]


def _encode(model, tokenizer, text: str) -> list[int]:
    return encode_prompt(model, tokenizer, text)[0].tolist()


def _generation(batcher: ContinuousBatcher, body: _Body, adapter: str | None, prompt_ids: list[int],
                stop_ids: frozenset[int], prompt_param: str) -> Generation:
    room = batcher.context_length - len(prompt_ids)
    if room <= 0:
        raise APIError(413, f"The prompt is {len(prompt_ids)} tokens long; this model's context holds "
                            f"{batcher.context_length} tokens (prompt and reply). Shorten the {prompt_param}.",
                       prompt_param, "context_length_exceeded")
    if not prompt_ids:
        raise APIError(400, f"The {prompt_param} is empty", prompt_param)
    limit = body.token_limit()
    options = SamplingOptions(max_new_tokens=min(limit or room, room), temperature=body.temperature,
                              top_p=body.top_p, top_k=0, seed=body.seed)
    return Generation(prompt_ids, adapter, options, emit=lambda event: None, stop_ids=stop_ids,
                      stop_strings=body.stop_strings())


async def _respond(batcher: ContinuousBatcher, generation: Generation, body: _Body, request: Request, chat: bool,
                   tools: _ToolPlan | None = None):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:  # called on the decode thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            generation.cancel()

    generation.emit = emit
    batcher.submit(generation)
    reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        return StreamingResponse(_stream(queue, generation, body, reply_id, chat, tools),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        pieces, last = [], None
        while last is None:
            try:
                event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            pieces.append(event.text)
            if event.finish_reason is not None:
                last = event
    finally:
        generation.cancel()  # frees the row if the request ended early; no-op once finished
    _raise_failure(last)
    text = "".join(pieces)
    choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
    if not chat:
        choice["text"] = text
    elif tools is not None and (parsed := tools.parse(text))[1]:
        choice["message"] = {"role": "assistant", "content": parsed[0], "tool_calls": parsed[1]}
        choice["finish_reason"] = "tool_calls"
    else:
        choice["message"] = {"role": "assistant", "content": text}
    return {"id": reply_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": [choice], "usage": _usage(last)}


async def _stream(queue: asyncio.Queue, generation: Generation, body: _Body, reply_id: str,
                  chat: bool, tools: _ToolPlan | None = None) -> AsyncIterator[str]:
    created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    splitter = ToolCallStream(tools.format, tools.names) if tools is not None else None

    def chunk(text: str | None, finish: str | None, first: bool = False, calls: list | None = None) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            if calls:
                delta["tool_calls"] = calls
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({"id": reply_id, "object": kind, "created": created, "model": body.model, "choices": [choice]})

    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            event: Event = await queue.get()
            if event.finish_reason in ("error", "cancelled"):
                failure = _failure(event)
                yield _sse(failure.body())
                break
            text = splitter.push(event.text) if splitter is not None else event.text
            if text:
                yield chunk(text, None)
            if event.finish_reason is not None:
                finish = event.finish_reason
                if splitter is not None:
                    tail, calls = splitter.finish()
                    if tail:
                        yield chunk(tail, None)
                    for index, call in enumerate(tools.shape(calls)):  # each call whole, in its own chunk
                        yield chunk(None, None, calls=[{"index": index, **call}])
                    finish = "tool_calls" if calls else finish
                yield chunk(None, finish)
                if body.include_usage():
                    yield _sse({"id": reply_id, "object": kind, "created": created, "model": body.model,
                                "choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # the client went away mid-stream: free the row at the next step


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _failure(event: Event) -> APIError:
    if event.finish_reason == "cancelled":
        return APIError(503, "The server is shutting down; retry.", kind="server_error", code="server_shutdown")
    return APIError(500, f"Generation failed: {event.error}", kind="server_error", code="generation_failed")


def _raise_failure(event: Event) -> None:
    if event.finish_reason in ("error", "cancelled"):
        raise _failure(event)
