"""The OpenAI-compatible HTTP API of ``qlora serve``, as a FastAPI application.

Routes: ``POST /v1/chat/completions``, ``POST /v1/responses`` (and ``GET``/``DELETE
/v1/responses/{id}``, ``GET /v1/responses/{id}/input_items`` for kept responses, ``POST
/v1/responses/{id}/cancel`` for background ones), the Conversations API (``/v1/conversations``,
its ``items``), ``POST /v1/completions``, ``GET /v1/models`` (the base model and each adapter, by id), plus
``GET /health`` (no key needed), ``GET /stats`` (the batcher's counters), vLLM's ``POST /tokenize`` and
``/detokenize`` (a prompt's or a chat's token ids, as the completions and chat routes make them, and back) and
``GET /version``, and, when allowed, vLLM's ``POST
/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (:mod:`qlora.serve.adapter_updates`). The request's
``model`` picks the adapter; every choice of a request (``n`` of them, for each
prompt of a completions batch) becomes one row of the shared
:class:`qlora.infer.batcher.ContinuousBatcher`, so concurrent requests for
different adapters are decoded in the same batch. Errors are OpenAI-shaped JSON
(:class:`qlora.serve.protocol.APIError`), an internal one a 500 logged with its traceback; a chat or
completions stream failing midway sends its error object as a data line, then ``[DONE]`` (as OpenAI's and
vLLM's do: the ``openai`` client raises it); a streaming client that disconnects has its row dropped at the
next step.

Function calling: ``tools`` go to the chat template, and the reply is parsed for
calls in the markup that template uses (:mod:`qlora.infer.tool_calls`); calls
come back as ``message.tool_calls`` with ``finish_reason: "tool_calls"``. A
stream holds text back from where call markup may begin and sends the calls, whole,
when the reply ends.

The Responses API is the chat route seen through :mod:`qlora.serve.responses`: a request is
translated into a chat request and set up by the same ``chat_choices``; only the reply is
written differently (a ``response`` object, or its typed stream events).

Structured replies (``response_format``) decode each choice under its own
:class:`qlora.infer.json_reply.JsonReply`; logprobs come with the batcher's events and
are written in OpenAI's chat or completions shape (see :mod:`qlora.serve.protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..chat.prefix_lm import prefix_type
from ..chat.prefix_suffix import image_prompt as prefix_prompt
from ..errors import UsageError
from ..infer.batcher import BatcherClosed, ContinuousBatcher, Event, UnknownAdapter
from ..infer.batcher import Request as Generation
from ..infer.forced_call import CallMarkup, ForcedCall, ForcedCallUnsupported, call_markup
from ..infer.generate import SamplingOptions, default_stop_ids, encode_prompt
from ..infer.json_reply import JsonReply
from ..infer.logprobs import TokenLogprob, TokenPieces
from ..infer.regex_reply import RegexReply
from ..infer.sampling_options import model_defaults
from ..infer.template import chat_template, render_chat, renders_tools, stop_token_ids
from ..infer.reply_reading import ReplyReader, ReplyText, Splitter
from ..infer.tool_calls import ToolCall, ToolCallFormat, ToolCallStream, markup_token_ids, tool_call_format
from ..infer.turn_end import TurnEnds
from ..model.chat_format import ChatFormat
from ..model.image_pixels import PixelBounds
from ..model.in_place_weights import in_place_adapter
from . import conversations as conv
from .adapter_updates import (LoadAdapterRequest, UnloadAdapterRequest, adapter_folder, attach, check_lora_name,
                              detach)
from .background import BackgroundRun
from .logprobs import TextOffsets, chat_logprobs, completion_logprobs, prompt_logprob_maps
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       _Body, sse)
from .request_size import DEFAULT_MAX_REQUEST_BYTES, LimitBody, refuse_overlong_text
from .response_store import DEFAULT_CAPACITY, RUNNING, ResponseStore, list_page, with_ids
from .responses import (FINISHED, ResponsesRequest, ResponseWriter, StreamedMessage, checked_include,
                        drop_oldest_turn, partial_output, shown)
from .vllm_extras import Guide, check_extras, refuse_dead_start, stop_ids as request_stop_ids, token_filter, truncated

log = logging.getLogger("qlora")
TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


def _template_failure(exc: Exception, own_template: bool) -> APIError:
    """The 400 of a chat template that failed on a request's messages: the request's ``chat_template`` named where
    it sent one, else the messages."""
    if own_template:
        return APIError(400, f"The request's 'chat_template' failed on these messages: {exc}", "chat_template")
    return APIError(400, f"The model's chat template rejected these messages: {exc}", "messages")


def build_app(batcher: ContinuousBatcher, base_id: str, adapters: list[str], api_key: str | None = None,
              chat_formats: dict[str | None, ChatFormat | None] | None = None,
              stored_responses: int = DEFAULT_CAPACITY, stored_conversations: int = conv.DEFAULT_CAPACITY,
              model_dir: str | None = None, pixel_bounds: dict[str | None, PixelBounds] | None = None,
              trust_request_chat_template: bool = False,
              template_kwargs: dict[str, Any] | None = None,
              adapter_settings: Callable[[Path], tuple[ChatFormat | None, PixelBounds]] | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The application serving ``batcher``'s model as ``base_id`` and each adapter as its name.

    Args:
        batcher: a started batcher; its model holds the adapters by these names.
        base_id: model id of the base alone; not served when an adapter wrote base weights in place
            (trainable tokens; ``modules_to_save`` loaded to train on), whose weights then stand in the
            base's stead. Modules trained whole are otherwise a copy per adapter, each row running its own.
        adapters: adapter names, served as model ids.
        api_key: when set, every request but ``GET /health`` needs ``Authorization: Bearer <api_key>``.
        chat_formats: adapter name (``None``: the base) -> the chat format its chat requests are rendered
            with (the one it was trained with); missing or ``None``: the tokenizer's own template.
        stored_responses: how many Responses API responses are kept in memory for ``previous_response_id``
            and ``GET /v1/responses/{id}`` (the least recently used dropped first, never a background one
            still running; 0 keeps none).
        stored_conversations: how many conversations (``/v1/conversations``) are kept in memory (the least
            recently used dropped first; 0 keeps none).
        model_dir: the model folder, whose processor turns images sent in chat messages into the model's inputs
            (default: ``base_id``).
        pixel_bounds: adapter name (``None``: the base) -> the bounds its requests' images are scaled into before
            the processor (the ones it was trained with); missing: none.
        trust_request_chat_template: render a chat request's own ``chat_template`` (vLLM's
            ``--trust-request-chat-template``); otherwise such a request is a 400.
        template_kwargs: chat template variables of every chat request (vLLM's ``--default-chat-template-kwargs``),
            over each format's own; a request's ``chat_template_kwargs`` are merged over them.
        adapter_settings: when given, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` load and unload
            adapters while serving (:mod:`qlora.serve.adapter_updates`); it gives a loaded adapter folder's chat format
            and pixel bounds, as ``chat_formats`` and ``pixel_bounds`` give those of the adapters served from the start.
        max_request_bytes: a request body over this many bytes is answered 413 before it is read whole (0: no
            limit; :mod:`qlora.serve.request_size`).
    """
    chat_formats = dict(chat_formats or {})  # own copies: loads and unloads change them
    pixel_bounds = dict(pixel_bounds or {})
    model, tokenizer = batcher.model, batcher.tokenizer
    chat_stops = frozenset(stop_token_ids(model, tokenizer))
    text_stops = frozenset(default_stop_ids(model, tokenizer))
    turn_ends = TurnEnds(tokenizer, chat_stops)  # asked on the set-up thread alone: no lock
    reader = ReplyReader(tokenizer)  # how replies are read (reasoning markup, harmony), asked there too
    ids = {base_id: None, **{name: name for name in adapters}}
    written = in_place_adapter(model)
    if written:  # the base's own modules were overwritten by the adapter's: there is no base to serve
        del ids[base_id]
        gone = {base_id: f"adapter {written[0]!r} trained {', '.join(written[1])} in the base model itself, "
                         "so the base alone is not in memory; serve the base from another qlora serve"}
    else:
        gone = {}
    created = int(time.time())
    store = ResponseStore(stored_responses)
    conversations = conv.ConversationStore(stored_conversations)
    # Setting a request up is CPU work (rendering, tokenizing, images decoded and run through the processor, its
    # first load, the retries of truncation "auto"): it runs on this one thread, not the event loop, so streams go on
    # meanwhile. One thread keeps set-ups one at a time, as they were on the loop: the lazily built processor and
    # tool-template answers below and the per-tokenizer tables need no locks, and the batcher sees only submit().
    setup = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlora-serve-setup")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Not waiting: a set-up still running (an image in a slow processor) would hold the shutdown; the thread
        # ends once it returns, and set-ups not started yet are dropped (their requests are gone with the server).
        setup.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qlora serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(_InternalErrors)
    app.add_middleware(LimitBody, limit=max_request_bytes)  # inside the key's check: a request without it gets 401
    if api_key is not None:
        app.add_middleware(_RequireKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc, request.headers.get("content-type", "")).body(), status_code=400)

    routes = ["/v1/chat/completions", "/v1/responses", "/v1/conversations", "/v1/completions", "/v1/models",
              "/tokenize", "/detokenize"]
    if adapter_settings is not None:
        routes += ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"]

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(_http_error(request, exc, routes).body(), status_code=exc.status_code, headers=exc.headers)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD too: what some uptime monitors send
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version")  # vLLM's
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return batcher.load()

    def model_card(mid: str) -> dict[str, Any]:  # vLLM's card: its max_model_len is what clients size prompts by
        return {"id": mid, "object": "model", "created": created, "owned_by": "qlora", "root": base_id,
                "parent": None if ids[mid] is None else base_id, "max_model_len": batcher.context_length}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(mid) for mid in ids]}

    loading: set[str] = set()  # names of loads under way: a second load of the name is refused meanwhile

    def served_adapter(model_id: str) -> str | None:
        """The adapter ``model_id`` serves (:func:`_adapter`); one whose load is under way is a 404 saying so (vLLM
        answers it as a model that does not exist, not waiting for the load)."""
        return _adapter(ids, model_id, gone | dict.fromkeys(loading, "its load (POST /v1/load_lora_adapter) is under "
                                                                      "way; retry once that load is answered"))

    @app.get("/v1/models/{model_id:path}")  # client.models.retrieve; an id may hold "/" (--served-model-name org/x)
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        served_adapter(model_id)
        return model_card(model_id)

    def updates_allowed() -> None:
        if adapter_settings is None:
            raise APIError(404, "This server does not load or unload adapters while serving; start qlora serve with "
                                "--allow-adapter-updates to allow it.", code="adapter_updates_off")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        updates_allowed()
        name = body.lora_name
        check_lora_name(name)
        if name == base_id:
            raise APIError(400, f"{name!r} is the base model's id; choose another lora_name.", "lora_name")
        if name in loading:
            raise APIError(400, f"The adapter {name!r} is being loaded already; choose another lora_name, or unload it "
                                "once that load is answered.", "lora_name")
        if name in ids or name in gone:
            raise APIError(400, f"The adapter {name!r} is loaded already; unload it first or choose another "
                                "lora_name.", "lora_name")
        folder = adapter_folder(body.lora_path)
        loading.add(name)
        try:
            chat_format, bounds = await asyncio.to_thread(attach, batcher, folder, name, adapter_settings)
        finally:
            loading.discard(name)
        chat_formats[name], pixel_bounds[name] = chat_format, bounds
        tool_templates.pop(name, None)
        ids[name] = name
        return PlainTextResponse(f"Success: LoRA adapter {name!r} added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        updates_allowed()
        name = body.lora_name
        if name == base_id:
            raise APIError(400, f"{name!r} is the base model, which cannot be unloaded; give an adapter's name.",
                           "lora_name")
        if name in gone:
            raise APIError(409, f"The adapter {name!r} is being unloaded already.", "lora_name", "adapter_in_use")
        if name in loading:
            raise APIError(409, f"The adapter {name!r} is being loaded; retry the unload once its load is done.",
                           "lora_name", "adapter_in_use")
        if name not in ids:
            raise APIError(404, f"The adapter {name!r} is not loaded; this server has {', '.join(ids)} "
                                "(see GET /v1/models).", "lora_name", "adapter_not_found")
        gone[name] = "it is being unloaded"  # new requests for it are refused meanwhile
        try:
            await asyncio.to_thread(detach, batcher, name)
        finally:
            del gone[name]
        del ids[name]
        for table in (chat_formats, pixel_bounds, tool_templates):
            table.pop(name, None)
        return PlainTextResponse(f"Success: LoRA adapter {name!r} removed successfully.")

    async def off_loop(fn, *args):
        """``fn(*args)`` on the set-up thread; its exceptions (APIErrors included) raised here."""
        return await asyncio.get_running_loop().run_in_executor(setup, functools.partial(fn, *args))

    tool_templates: dict[str | None, bool] = {}  # adapter -> whether its template renders tools
    processors: list = []  # the model's image processor, once a request sends images
    # looked at once: a request's set-up walking the modules while an adapter loads would see them change size
    rope_deltas = any(hasattr(m, "rope_deltas") for m in model.modules())

    def image_processor_for(model_id: str):
        """The model's image processor (loaded once), or a 400 naming ``model_id`` that cannot take images."""
        from ..infer.images import image_processor

        if not batcher.unbatchable and rope_deltas:
            raise APIError(400, f"The model {model_id!r} ({model.config.model_type}) positions image tokens with rope "
                                "deltas kept from the prefill, which the continuous batcher's steps do not carry; "
                                "images are not served for it: use qlora generate --image or qlora chat", "messages")
        with _images_refused(model_id):
            if not processors:
                processors.append(image_processor(model, tokenizer, model_dir or getattr(model, "name_or_path", base_id),
                                                  "messages"))
        return processors[0]

    def image_prompt(model_id: str, adapter: str | None, prompt: str, images: list) -> tuple[list[int], dict]:
        """The prompt's ids with its images' tokens (each image scaled into ``adapter``'s pixel bounds), and the
        image tensors for its prefill."""
        from ..infer.images import encode_with_images

        processor = image_processor_for(model_id)
        with _images_refused(model_id):
            ids, media = encode_with_images(processor, model, prompt, images,
                                            pixel_bounds.get(adapter, PixelBounds()))
        return ids[0].tolist(), media

    def request_format(body: ChatCompletionRequest) -> ChatFormat | None:
        """The request's own ``chat_template`` as the format it is rendered with (None: it sent none).

        Raises:
            APIError: the server does not trust request templates, or the template is not valid Jinja.
        """
        if body.chat_template is None:
            return None
        if not trust_request_chat_template:
            raise APIError(400, "'chat_template': this server renders only the model's chat template (and each "
                                "adapter's). Start qlora serve with --trust-request-chat-template to accept templates "
                                "sent with requests (as vLLM asks), or leave 'chat_template' out", "chat_template")
        from jinja2 import Environment, TemplateSyntaxError

        try:
            Environment().parse(body.chat_template)
        except TemplateSyntaxError as exc:
            raise APIError(400, f"'chat_template' is not valid Jinja: {exc.message} (line {exc.lineno}); fix the "
                                "template", "chat_template") from None
        return ChatFormat(body.chat_template, "the request's chat_template")

    def chat_choices(body: ChatCompletionRequest, adapter: str | None, prompt_param: str = "messages",
                     fits: bool = True) -> list[_Choice]:
        """The batch rows of a chat request (``n`` choices), its tools, forced call and JSON reply set up;
        ``prompt_param`` names the request's field a too-long or empty prompt came from; ``fits=False``: a prompt
        longer than the context is not refused (``/tokenize`` counts it)."""
        chat_format = request_format(body) or chat_formats.get(adapter)
        guide = check_extras(body, batcher.context_length)
        masked = token_filter(body, tokenizer)
        template_options = body.template_options(template_kwargs)
        messages = [m.message(i) for i, m in enumerate(body.messages)]
        images = [ref for m in messages for ref in m.images]
        if images:
            image_processor_for(body.model)  # a text-only model is named before its template sees image parts
            if body.truncate_prompt_tokens is not None:
                raise APIError(400, "'truncate_prompt_tokens' would cut the image tokens of the prompt from the "
                                    "images they stand for; send the request without it", "truncate_prompt_tokens")
            if body.add_special_tokens:
                raise APIError(400, "'add_special_tokens' cannot be served with images: the model's processor "
                                    "tokenizes a prompt with images; send the request without it",
                               "add_special_tokens")
        tools, plan, markup, forced = body.function_tools(), None, None, None
        # a prefix-LM's (PaliGemma's) images and prompt are its processor's prefix, as it trained on them: no chat
        # format, no tools, the reply ends at EOS
        prefix = bool(images) and prefix_type(model) is not None
        if prefix and (tools or body.chat_template is not None):
            param = "tools" if tools else "chat_template"
            raise APIError(400, f"'{param}' cannot be served with images for {body.model!r} "
                                f"({model.config.model_type}): its prompt with images is its processor's prefix, the "
                                f"images then the text, with no chat format; send the request without '{param}'",
                           param)
        stops = text_stops if prefix else chat_stops
        if tools:
            if body.chat_template is not None:  # the request's own template, asked each time
                shows_tools = renders_tools(tokenizer, chat_format)
            else:
                if adapter not in tool_templates:
                    tool_templates[adapter] = renders_tools(tokenizer, chat_format)
                shows_tools = tool_templates[adapter]
            if not shows_tools:
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
        if template_options["documents"] is not None and "documents" not in (
                chat_template(tokenizer, chat_format, tools=bool(tools)) or ""):
            raise APIError(400, f"The chat template of {body.model!r} has no place for 'documents' (it never reads "
                                "them), so the model would not see them; put their text in the messages instead",
                           "documents")
        json_reply = body.json_reply()
        if guide is not None and (json_reply is not None or plan is not None):
            raise APIError(400, f"'{guide.param}' cannot be combined with 'response_format' or with 'tools' the model "
                                "may call (one constraint per reply)", guide.param)
        _refuse_unending(body, guide is not None or json_reply is not None or markup is not None)
        if masked is not None and markup is not None:
            param = "allowed_token_ids" if body.allowed_token_ids is not None else "bad_words"
            raise APIError(400, f"'{param}' cannot be combined with a forced tool call ('tool_choice' "
                                f"{body.tool_choice!r}): its call markup is written by fixed tokens, which the mask "
                                "could not hold back; send 'tool_choice': 'auto', or the request without it", param)
        try:
            prompt = prefix_prompt(image_processor_for(body.model), [m.as_dict() for m in messages]) if prefix else \
                render_chat(tokenizer, messages, chat_format=chat_format, tools=tools, template_kwargs=template_options)
        except UsageError as exc:  # a prefix-LM's messages ending with an answer; else a template's failure, as below
            if prefix:
                raise APIError(400, str(exc), "messages") from None
            raise _template_failure(exc, body.chat_template is not None) from None
        except RecursionError:  # the template writes each nested value by recursing (tojson)
            raise APIError(400, "The chat template cannot write these messages or tools: they nest too deeply for "
                                "it (a tool's parameters nested hundreds of levels, say); flatten them",
                           "tools" if tools else "messages") from None
        except Exception as exc:  # e.g. a template that allows no system turn, or needs alternating roles
            raise _template_failure(exc, body.chat_template is not None) from None
        media = None
        if images:
            prompt_ids, media = image_prompt(body.model, adapter, prompt, images)
        else:
            if body.truncate_prompt_tokens is None:  # kept whole: one past the context is refused before it all is read
                refuse_overlong_text(tokenizer, prompt, batcher.context_length, prompt_param)
            prompt_ids = tokenizer(prompt, add_special_tokens=body.add_special_tokens).input_ids  # vLLM's default:
            # none, the template writes them (apply_chat_template(tokenize=True)'s ids)
        template = chat_template(tokenizer, chat_format, tools=bool(tools))
        # constrained replies (a forced call, a JSON reply, a guide) are written from their first token: no reasoning
        read = not prefix and guide is None and json_reply is None and markup is None and reader.reads(
            template, chat_format, template_options)
        if read:  # the reply's reasoning (or gpt-oss's channels) is read apart from its answer
            read_with = functools.partial(reader.splitter, prompt, template, chat_format, template_options)
            plan = replace(plan, read=read_with) if plan is not None else _ToolPlan(
                tool_call_format(""), (), False, offered=False, read=read_with)
        # a turn end this vocabulary spells as text (ChatML without an <|im_end|> token) ends a reply as a 'stop'
        # string does; not one that goes on past its end of turn (ignore_eos) or ends where its constraint does
        ends_turn = () if prefix or body.ignore_eos or guide is not None or json_reply is not None else turn_ends(
            chat_format, template_options, tools)
        role = body.reply_role(template_options)
        last = body.messages[-1]
        echo = last.text(len(body.messages) - 1)[0] if body.echo and last.role == role else ""
        choices = []
        for index in range(body.n):  # each choice is its own row, with its own constraint state and seed
            generation = _generation(batcher, body, adapter, prompt_ids, stops, prompt_param, index, fits)
            # continuing the last message: its text goes on after the prompt's, its first word's space kept (vLLM)
            generation.continues_prompt = template_options["continue_final_message"]
            generation.media = media
            generation.turn_ends = ends_turn
            generation.prompt_logprobs = body.prompt_logprobs
            generation.token_filter = masked
            if plan is not None:
                generation.keep_tokens = markup_token_ids(plan.format, tokenizer) if plan.offered else frozenset()
                if read:
                    generation.keep_tokens |= reader.keep(template, chat_format, template_options)
            if markup is not None:  # a forced call: no stop strings inside it, one call, its end forced
                generation.stop_strings = generation.turn_ends = ()
                generation.constraint = ForcedCall(tokenizer, markup, tools, forced or None, generation.keep_tokens,
                                                   chat_stops)
            if json_reply is not None:
                generation.constraint = JsonReply(tokenizer, json_reply[0], stops, root_object=json_reply[1])
            if guide is not None:
                generation.constraint = _guided(guide, tokenizer, stops)
            if index == 0:  # the same start for every choice
                what = guide.param if guide is not None else \
                    "response_format" if json_reply is not None else "tool_choice"
                refuse_dead_start(generation.constraint, masked, what, len(tokenizer))
            choices.append(_Choice(index, generation, plan, echo=echo, first=index == 0, role=role))
        return choices

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.refuse_unsupported()
        choices = await off_loop(chat_choices, body, served_adapter(body.model))
        return await _respond(batcher, choices, body, request, chat=True)

    def response_choice(body: ResponsesRequest, adapter: str | None,
                        items: list[tuple[str, dict[str, Any]]]) -> tuple[_Choice, list[tuple[str, dict[str, Any]]]]:
        """The batch row of a Responses request and the conversation items it reads (its oldest turns
        dropped while the prompt is too long, under ``truncation: "auto"``)."""
        while True:
            chat, origins = body.chat_request(items)
            try:
                chat.refuse_unsupported()
                (choice,) = chat_choices(chat, adapter, "input")
                return choice, items
            except APIError as exc:
                retry = exc.code == "context_length_exceeded" and body.truncation == "auto"
                shorter = drop_oldest_turn(items) if retry else None
                if shorter is None:
                    raise body.renamed(exc, origins) from None
                items = shorter

    def referenced(items: list[dict[str, Any]], param: str = "input") -> list[dict[str, Any]]:
        """``items`` (the request's ``param``) with each ``item_reference`` replaced by the item it names: one a kept
        response read or wrote, or one of a kept conversation (a 404 naming the id when none is kept)."""
        out = []
        for i, item in enumerate(items):
            if not (isinstance(item, dict) and item.get("type") == "item_reference"):
                out.append(item)
                continue
            item_id = item.get("id")
            if not isinstance(item_id, str):
                raise APIError(400, f"{param}.{i} (item_reference) needs 'id': the id of a stored item",
                               f"{param}.{i}.id")
            found = store.item(item_id) or conversations.item(item_id)
            if found is None:
                raise APIError(404, f"Item with id {item_id!r} not found ({param}.{i} refers to it). Only items of "
                                    "responses this server keeps (sent with 'store': true) and of its conversations "
                                    "can be referred to; send the item itself instead.", f"{param}.{i}.id", "not_found")
            out.append(found)
        return out

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        body.refuse_unsupported()
        if body.background and store.capacity <= 0:
            raise APIError(400, "Background mode keeps the response to poll, and this server keeps none (started with "
                                "--stored-responses 0); send the request without 'background'.", "background")
        adapter = served_adapter(body.model)
        conversation = body.conversation_id()
        if conversation is not None:
            history = conversations.get(conversation, "conversation").items
        else:
            history = store.previous(body.previous_response_id).conversation if body.previous_response_id else []
        own = with_ids(referenced(body.input_items()))
        choice, items = await off_loop(response_choice, body, adapter, body.conversation_items(history, own))
        input_items = with_ids([item for _, item in items])
        run: BackgroundRun | None = None

        def keep(response: dict[str, Any]) -> None:
            finished = response["status"] in FINISHED
            if body.background or (body.store is not False and finished):
                store.keep(response, input_items, run)
            if conversation is not None and finished:
                conversations.extend(conversation, own + response["output"])

        writer = ResponseWriter(body, TokenPieces.of(tokenizer), keep, sampling=choice.generation.options)
        queue = _submit(batcher, [choice])
        if body.background:
            def cancelled() -> str:  # the response keeps what was generated before the cancel
                return writer.event("response.failed",
                                    response=writer.state("cancelled", partial_output(run.streaming)))

            run = BackgroundRun(cancelled, keep_events=body.stream)
            queued = writer.state("queued", [])
            run.start(_response_events(queue, choice, writer, run))
            return _event_stream(run.replay()) if body.stream else queued
        if body.stream:
            return _event_stream(_response_events(queue, choice, writer))
        if not await _gather(queue, [choice], request):
            return JSONResponse({}, status_code=499)
        content, calls, reasoning = (choice.tools.parse(choice.text) if choice.tools is not None
                                     else (choice.text, [], ""))
        output = writer.output(content, calls, choice.last.finish_reason, choice.logprobs, reasoning)
        return writer.state(writer.status(choice.last.finish_reason, calls), output, _usage([choice]))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(request: Request, response_id: str, stream: bool = False, starting_after: int = -1):
        include = _include(request)
        kept = store.get(response_id)
        if not stream:
            response = kept.current()
            return response | {"output": shown(response["output"], include)}
        if kept.run is None:
            raise APIError(400, "This response cannot be streamed because it was not created with background=true; "
                                "GET it without 'stream'.", "stream")
        if not kept.run.keep_events:
            raise APIError(400, "This response cannot be streamed because it was not created with stream=true; "
                                "GET it without 'stream'.", "stream")
        return _event_stream(kept.run.replay(starting_after))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> dict[str, Any]:
        kept = store.get(response_id)
        status = kept.response["status"]
        if kept.run is None:
            raise APIError(400, "Cannot cancel a synchronous response: only responses created with 'background': true "
                                "can be cancelled (a client stops any other by closing its connection).")
        if status in RUNNING:
            await kept.run.cancel()
        elif status != "cancelled":
            raise APIError(400, f"Cannot cancel a{'n' if status[0] in 'aeiou' else ''} {status} response.")
        return store.get(response_id).response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(request: Request, response_id: str, order: str = "desc", limit: int = 20,
                                   after: str | None = None) -> dict[str, Any]:
        include = _include(request)
        return list_page(shown(store.get(response_id).input_items, include), order, limit, after)

    @app.post("/v1/conversations")
    async def create_conversation(body: conv.CreateBody) -> dict[str, Any]:
        return conversations.create(referenced(body.items or [], "items"), body.metadata).object()

    @app.get("/v1/conversations/{conversation_id}")
    async def retrieve_conversation(conversation_id: str) -> dict[str, Any]:
        return conversations.get(conversation_id).object()

    @app.post("/v1/conversations/{conversation_id}")
    async def update_conversation(conversation_id: str, body: conv.UpdateBody) -> dict[str, Any]:
        found = conversations.get(conversation_id)
        found.metadata = conv.check_metadata(body.metadata)
        return found.object()

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str) -> dict[str, Any]:
        conversations.delete(conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @app.get("/v1/conversations/{conversation_id}/items")
    async def conversation_items(request: Request, conversation_id: str, order: str = "desc", limit: int = 20,
                                 after: str | None = None) -> dict[str, Any]:
        include = _include(request)
        return list_page(shown(conversations.get(conversation_id).items, include), order, limit, after)

    @app.post("/v1/conversations/{conversation_id}/items")
    async def add_conversation_items(request: Request, conversation_id: str, body: conv.ItemsBody) -> dict[str, Any]:
        include = _include(request)
        conversations.get(conversation_id)  # a 404 for the conversation first
        added = shown(conversations.add(conversation_id, referenced(body.items, "items")), include)
        return {"object": "list", "data": added, "first_id": added[0]["id"] if added else None,
                "last_id": added[-1]["id"] if added else None, "has_more": False}

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}")
    async def conversation_item(request: Request, conversation_id: str, item_id: str) -> dict[str, Any]:
        include = _include(request)
        return shown([conversations.get(conversation_id).item(item_id)], include)[0]

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}")
    async def delete_conversation_item(conversation_id: str, item_id: str) -> dict[str, Any]:
        found = conversations.get(conversation_id)
        found.items.remove(found.item(item_id))
        return found.object()

    def completion_choices(body: CompletionRequest, adapter: str | None) -> list[_Choice]:
        """The batch rows of a completions request: ``n`` choices for each of its prompts."""
        guide = check_extras(body, batcher.context_length)
        masked = token_filter(body, tokenizer)
        _refuse_unending(body, guide is not None)
        echo_logprobs = body.logprobs if body.echo else None  # the echoed prompt's entries, with its alternatives
        scored = [k for k in (echo_logprobs, body.prompt_logprobs) if k is not None]
        choices = []
        for number, prompt in enumerate(body.prompts()):
            if isinstance(prompt, str) and body.truncate_prompt_tokens is None:
                refuse_overlong_text(tokenizer, prompt, batcher.context_length, "prompt")
            if isinstance(prompt, str) and not body.add_special_tokens:
                prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            elif isinstance(prompt, str):
                prompt_ids = _encode(model, tokenizer, prompt)
            elif all(0 <= t < len(tokenizer) for t in prompt):
                prompt_ids = list(prompt)
            else:
                raise APIError(400, f"'prompt' token ids must lie in [0, {len(tokenizer)})", "prompt")
            echo = "" if not body.echo else prompt if isinstance(prompt, str) else \
                tokenizer.decode(prompt_ids, skip_special_tokens=True)
            for index in range(body.n):
                generation = _generation(batcher, body, adapter, prompt_ids, text_stops, "prompt", index)
                generation.continues_prompt = True  # its first word's leading space kept, as vLLM's
                generation.prompt_logprobs = max(scored) if scored else None
                generation.token_filter = masked
                if guide is not None:
                    generation.constraint = _guided(guide, tokenizer, text_stops)
                    if number == index == 0:
                        refuse_dead_start(generation.constraint, masked, guide.param, len(tokenizer))
                choices.append(_Choice(number * body.n + index, generation, echo=echo, first=index == 0,
                                       echo_logprobs=echo_logprobs))
        return choices

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.refuse_unsupported()
        choices = await off_loop(completion_choices, body, served_adapter(body.model))
        return await _respond(batcher, choices, body, request, chat=False)

    def token_ids(body: TokenizeRequest, model_id: str, adapter: str | None) -> list[int]:
        if body.prompt is not None and body.add_special_tokens is False:
            return tokenizer(body.prompt, add_special_tokens=False).input_ids
        if body.prompt is not None:
            return _encode(model, tokenizer, body.prompt)
        return chat_choices(body.chat(model_id), adapter, fits=False)[0].generation.prompt_ids  # vLLM checks no length

    @app.post("/tokenize")  # vLLM's: what a prompt or a chat costs, in the tokens the model reads
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        model_id = body.model if body.model is not None else next(iter(ids))
        found = await off_loop(token_ids, body, model_id, served_adapter(model_id))
        return {"count": len(found), "max_model_len": batcher.context_length, "tokens": found,
                "token_strs": tokenizer.convert_ids_to_tokens(found) if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        if body.model is not None:
            served_adapter(body.model)
        for k, token in enumerate(body.tokens):
            if not 0 <= token < len(tokenizer):
                raise APIError(400, f"'tokens.{k}' is {token}, not a token id of this model's vocabulary (integers 0 "
                                    f"to {len(tokenizer) - 1})", f"tokens.{k}")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app


@contextlib.contextmanager
def _images_refused(model_id: str) -> Iterator[None]:
    """A :class:`~qlora.errors.UsageError` of the images' processing (a model without a vision tower, an image
    that cannot be read, a processor refusing the prompt) as the 400 naming ``model_id``."""
    try:
        yield
    except UsageError as exc:
        raise APIError(400, f"The model {model_id!r} cannot take these images: {exc}", "messages") from None


def _forced_markup(fmt: ToolCallFormat, template: str, body: ChatCompletionRequest) -> CallMarkup:
    try:
        return call_markup(fmt.name, template)
    except ForcedCallUnsupported as exc:
        raise APIError(400, f"'tool_choice' {body.tool_choice!r} cannot be served for {body.model!r}: {exc}. Send "
                            "'tool_choice': 'auto' (the model decides whether to call) instead.",
                       "tool_choice") from None


@dataclass(frozen=True)
class _ToolPlan:
    """How a chat reply is read for tool calls: the template's markup, the offered names (``offered``: any), one
    call or several; ``read``: what reads the reply's reasoning or gpt-oss's channels apart from its answer, given
    the tool-call splitter and the offered names (:meth:`~qlora.infer.reply_reading.ReplyReader.splitter`)."""

    format: ToolCallFormat
    names: tuple[str, ...]
    parallel: bool
    offered: bool = True
    read: Callable[[ToolCallStream | None, Sequence[str] | None], Splitter | None] | None = None

    def splitter(self) -> Splitter | None:
        """What splits the streamed reply into content to show and calls."""
        tools = ToolCallStream(self.format, self.names) if self.offered else None
        return self.read(tools, self.names if self.offered else None) if self.read is not None else tools

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]], str]:
        """The reply's content (None when it only calls), its calls in OpenAI's shape, and its reasoning."""
        reasoning = ""
        if self.read is None:
            content, calls = self.format.parse(text, self.names)
            content = content if calls else text
        else:
            reply = ReplyText([text], self.splitter())
            content = "".join(reply)
            calls, reasoning = reply.calls, reply.reasoning
        if not calls:
            return content, [], reasoning
        return content.strip() or None, self.shape(calls), reasoning

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


class _InternalErrors:
    """ASGI middleware: an exception escaping a route (a bug, not bad input) is logged once with its traceback
    and answered with a 500 in OpenAI's error shape.

    Starlette's handler for ``Exception`` re-raises after answering, and uvicorn then closes the connection
    under the client's keep-alive: its next request on it would fail. One raised after the response started
    (nothing can be sent in its place) is left to the server.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise
            log.exception("%s %s failed", scope["method"], scope["path"])
            await JSONResponse(_internal(exc).body(), status_code=500)(scope, receive, send)


def _validation_error(exc: RequestValidationError, content_type: str = "") -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    if tuple(first.get("loc", ())) == ("body",) and content_type and "json" not in content_type.lower():
        # FastAPI reads a body as JSON only when it says so (curl -d sends application/x-www-form-urlencoded)
        return APIError(400, f"The request body was sent as {content_type.split(';')[0]}; send it as JSON with "
                             "'Content-Type: application/json' (curl: -H 'Content-Type: application/json').",
                        code="invalid_content_type")
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"The request body is not valid JSON: {reason}", code="invalid_json")
    param = _param(first)
    same = [e for e in exc.errors() if _param(e) == param]  # a union's members each add one
    expected = [_EXPECTED.get(e.get("type", "")) for e in same]
    if param and all(expected):
        return APIError(400, f"Invalid type for '{param}': expected {' or '.join(dict.fromkeys(expected))}, but got "
                             f"{_json_kind(first.get('input'))} instead.", param)  # OpenAI's wording
    return APIError(400, f"Invalid request body: {param or 'body'}: {first.get('msg', 'invalid')}", param)


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
             "list_type": "an array", "dict_type": "an object", "model_type": "an object"}


def _param(error: dict[str, Any]) -> str | None:
    """The dotted body field a pydantic error is about, without "body" and the union-member tags pydantic adds
    ("str", "list[int]", ...)."""
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and (
        isinstance(p, int) or not (p in TYPE_TAGS or "[" in p))]
    return ".".join(loc) or None


def _json_kind(value: Any) -> str:
    """The JSON type of a parsed value, in OpenAI's words."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def _http_error(request: Request, exc: HTTPException, routes: list[str]) -> APIError:
    """Starlette's own refusals (a body it cannot parse, an unknown path or method) in OpenAI's error shape; an
    unknown path's names the API ``routes`` this server answers."""
    if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # JSON nested beyond the parser's depth
        return APIError(400, "The request body could not be parsed as JSON (malformed, or nested too deeply for "
                             "the parser); send a valid JSON object", code="invalid_json")
    if exc.status_code == 404:
        return APIError(404, f"Unknown path {request.url.path}: this server answers {', '.join(routes[:-1])} and "
                             f"{routes[-1]}", code="not_found")
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind)


def _include(request: Request) -> set[str]:
    """The ``include`` query parameter of a read (``include[]=...``, as the ``openai`` client sends it, or
    ``include=...``), checked."""
    query = request.query_params
    return checked_include(query.getlist("include[]") + query.getlist("include"))


def _adapter(ids: dict[str, str | None], model_id: str, gone: dict[str, str] | None = None) -> str | None:
    """The adapter name ``model_id`` serves (None: the base), or a 404 ``model_not_found`` naming the models this
    server has, as OpenAI and vLLM answer a model that does not exist."""
    if model_id in (gone or {}):
        raise APIError(404, f"The model {model_id!r} is not served here: {gone[model_id]}; this server has "
                               f"{', '.join(ids)} (see GET /v1/models).", "model", "model_not_found")
    if model_id not in ids:
        raise APIError(404, f"The model {model_id!r} does not exist; this server has {', '.join(ids)} "
                            "(see GET /v1/models).", "model", "model_not_found")
    return ids[model_id]


def _encode(model, tokenizer, text: str) -> list[int]:
    return encode_prompt(model, tokenizer, text)[0].tolist()


def _generation(batcher: ContinuousBatcher, body: _Body, adapter: str | None, prompt_ids: list[int],
                stop_ids: frozenset[int], prompt_param: str, index: int = 0, fits: bool = True) -> Generation:
    """The batch row of choice ``index`` (its own seed, see :func:`_choice_seed`); ``fits=False``: a prompt that
    leaves no room for a reply is kept (a row only counted, never run)."""
    prompt_ids = truncated(body, prompt_ids, batcher.context_length)
    room = batcher.context_length - len(prompt_ids)
    if room <= 0 and fits:
        raise APIError(400, f"This model's maximum context length is {batcher.context_length} tokens (prompt and "
                            f"reply). However, the {prompt_param} resulted in {len(prompt_ids)} tokens, which leaves "
                            f"no room for a reply. Shorten the {prompt_param}.", prompt_param,
                       "context_length_exceeded")  # vLLM's and OpenAI's 400
    if not prompt_ids:
        raise APIError(400, f"The {prompt_param} is empty", prompt_param)
    shipped = model_defaults(batcher.model, vllm=True)  # what the request leaves out (vLLM's default sampling parameters)
    given = body.model_fields_set
    limit = body.token_limit()
    if "max_new_tokens" in shipped and not given & {"max_tokens", "max_completion_tokens"}:
        limit = min(shipped["max_new_tokens"], room if limit is None else limit)
    if limit is not None and limit > room:  # vLLM's and OpenAI's 400, not a reply silently cut shorter
        field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"This model's maximum context length is {batcher.context_length} tokens. However, you "
                            f"requested {len(prompt_ids) + limit} tokens ({len(prompt_ids)} in the {prompt_param}, "
                            f"{limit} in the completion: '{field}'). Lower '{field}' to at most {room}, or shorten "
                            f"the {prompt_param}.", field, "context_length_exceeded")
    sampling = dict(temperature=body.temperature, top_p=body.top_p, top_k=max(0, body.top_k), min_p=body.min_p)
    sampling.update((name, value) for name, value in shipped.items() if name in sampling and name not in given)
    options = SamplingOptions(max_new_tokens=max(1, room if limit is None else limit), **sampling,
                              repetition_penalty=body.repetition_penalty,
                              presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                              logit_bias=body.token_bias(len(batcher.tokenizer)), seed=_choice_seed(body.seed, index))
    return Generation(prompt_ids, adapter, options, emit=lambda event: None,
                      stop_ids=request_stop_ids(body, stop_ids, len(batcher.tokenizer)),
                      stop_strings=body.stop_strings(), logprobs=body.logprob_count(), generate=limit != 0,
                      min_tokens=body.min_tokens, skip_special_tokens=body.skip_special_tokens,
                      include_stop=body.include_stop_str_in_output,
                      spaces_between_special_tokens=body.spaces_between_special_tokens)


def _guided(guide: Guide, tokenizer, stops: frozenset[int]):
    """A choice's constraint for vLLM's guided decoding (its own state)."""
    if guide.regex is not None:
        return RegexReply(tokenizer, guide.regex, stops)
    return JsonReply(tokenizer, guide.schema, stops, root_object=guide.root_object)


def _refuse_unending(body: _Body, constrained: bool) -> None:
    """400 for ``ignore_eos`` with a constrained reply, which ends where its constraint does. ``min_tokens`` is
    served as vLLM serves it there: the stop tokens are masked while the constraint may go on, and a reply its
    constraint must end (nothing but a stop may follow) ends, even before ``min_tokens``."""
    if constrained and body.ignore_eos:
        raise APIError(400, "'ignore_eos' cannot be combined with a constrained reply (guided decoding, a JSON "
                            "response_format or a forced tool call): the constraint ends the reply once it is "
                            "complete", "ignore_eos")


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice 0 takes the request's seed (so it equals the ``n=1`` reply); choice ``j`` a seed mixed from
    it and ``j`` (SplitMix64's finalizer), so choices are independent yet reproducible."""
    if seed is None:
        return None
    if index == 0:
        return seed % 2**63
    z = (seed + index * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


@dataclass
class _Choice:
    """One choice of a reply: its batch row, how its text is read, and what it received so far."""

    index: int
    generation: Generation
    tools: _ToolPlan | None = None
    echo: str = ""  # with echo: the prompt text (chat: the last message's), put before the reply
    role: str = "assistant"  # a chat reply's role
    first: bool = True  # the first choice of its prompt (its prompt is counted in usage)
    echo_logprobs: int | None = None  # completions' echo with logprobs: the prompt's entries lead, with k alternatives
    pieces: list[str] = field(default_factory=list)  # the events' texts, joined once when read (linear in the reply)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's entries, when the row scored its prompt
    last: Event | None = None
    tokens: int = 0  # reply tokens so far

    @property
    def text(self) -> str:
        """The reply so far."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def add(self, event: Event) -> list[TokenLogprob]:
        """Take ``event`` in; the logprob entries it adds to the reply's (the echoed prompt's first)."""
        self.pieces.append(event.text)
        added = event.logprobs
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
            if self.echo_logprobs is not None:
                added = [replace(e, top=e.top[:self.echo_logprobs]) for e in event.prompt_logprobs] + added
        self.logprobs += added
        self.tokens = event.completion_tokens
        if event.finish_reason is not None:
            self.last = event
        return added


def _submit(batcher: ContinuousBatcher, choices: list[_Choice]) -> asyncio.Queue[tuple[int, Event]]:
    """Queue the choices' rows on the batcher; their events arrive on the returned queue as (choice, event)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    for k, choice in enumerate(choices):
        choice.generation.emit = _emitter(loop, queue, k, choice.generation)
    try:
        batcher.submit_all([choice.generation for choice in choices])
    except BaseException as exc:
        _cancel(choices)
        if isinstance(exc, BatcherClosed):  # set up while the server began to shut down: what a running one gets
            raise _shutting_down() from None
        if isinstance(exc, UnknownAdapter):  # unloaded (POST /v1/unload_lora_adapter) while this was set up
            raise APIError(404, f"The model was unloaded while this request was set up ({exc}); see GET /v1/models.",
                           "model", "model_not_found") from None
        raise
    return queue


async def _gather(queue: asyncio.Queue[tuple[int, Event]], choices: list[_Choice], request: Request) -> bool:
    """Wait for every choice to finish (False: the client went away first, its rows are dropped).

    Raises:
        APIError: a choice failed, or the server is shutting down.
    """
    try:
        left = len(choices)
        while left:
            try:
                k, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return False
                continue
            choices[k].add(event)
            left -= event.finish_reason is not None
    finally:
        _cancel(choices)  # frees the rows if the request ended early; no-op once finished
    for choice in choices:
        _raise_failure(choice.last)
    return True


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _respond(batcher: ContinuousBatcher, choices: list[_Choice], body: _Body, request: Request, chat: bool):
    queue = _submit(batcher, choices)
    reply_id = ("chatcmpl-" if chat else "cmpl-") + (body.request_id or uuid.uuid4().hex)  # vLLM's request_id
    pieces = TokenPieces.of(batcher.tokenizer)
    if body.stream:
        return _event_stream(_stream(queue, choices, body, reply_id, chat, pieces))
    if not await _gather(queue, choices, request):
        return JSONResponse({}, status_code=499)
    out, as_ids = [], bool(body.return_tokens_as_token_ids)
    for choice in choices:
        last, text = choice.last, choice.text
        entry: dict[str, Any] = {"index": choice.index, "finish_reason": last.finish_reason, "logprobs": None}
        if not chat:
            entry["text"] = choice.echo + text
            if body.logprob_count() is not None:
                entry["logprobs"] = completion_logprobs(pieces, choice.logprobs, _offsets(pieces, choice, body), as_ids)
            if body.prompt_logprobs is not None:  # vLLM's, in each choice
                entry["prompt_logprobs"] = prompt_logprob_maps(pieces, choice.prompt_logprobs, body.prompt_logprobs)
        else:
            if body.logprob_count() is not None:
                entry["logprobs"] = {"content": chat_logprobs(pieces, choice.logprobs, as_ids), "refusal": None}
            parsed = choice.tools.parse(text) if choice.tools is not None else (text, [], "")
            if parsed[1]:
                entry["message"] = {"role": choice.role, "content": parsed[0], "tool_calls": parsed[1]}
                entry["finish_reason"] = "tool_calls"
            else:
                entry["message"] = {"role": choice.role, "content": choice.echo + parsed[0]}
            if parsed[2]:  # vLLM's field (its reasoning parsers'), beside the answer
                entry["message"]["reasoning"] = parsed[2]
        out.append(entry)
    reply = {"id": reply_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
             "model": body.model, "choices": out, "usage": _usage(choices)}
    if chat and body.prompt_logprobs is not None:  # vLLM's, beside the choices (every choice has this prompt)
        reply["prompt_logprobs"] = prompt_logprob_maps(pieces, choices[0].prompt_logprobs, body.prompt_logprobs)
    return reply


def _offsets(pieces: TokenPieces, choice: _Choice, body: _Body) -> TextOffsets:
    """The text offsets of a completions choice's logprobs: its echoed prompt's tokens first, when it has them."""
    echoed = choice.echo_logprobs is not None
    return TextOffsets(pieces, choice.echo if echoed else "", not body.skip_special_tokens,
                       len(choice.generation.prompt_ids) if echoed else 0)


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, k: int, generation: Generation):
    def emit(event: Event) -> None:  # called on the decode thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (k, event))
        except RuntimeError:  # the event loop is gone (server shutting down)
            generation.cancel()
    return emit


def _cancel(choices: list[_Choice]) -> None:
    for choice in choices:
        choice.generation.cancel()


async def _stream(queue: asyncio.Queue, choices: list[_Choice], body: _Body, reply_id: str, chat: bool,
                  pieces: TokenPieces) -> AsyncIterator[str]:
    created, kind = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    splitters = [c.tools.splitter() if c.tools is not None else None for c in choices]
    offsets = [_offsets(pieces, choice, body) for choice in choices]
    carried: list[list[TokenLogprob]] = [[] for _ in choices]  # logprobs whose text a splitter still holds
    want_logprobs, as_ids = body.logprob_count() is not None, bool(body.return_tokens_as_token_ids)

    def chunk(k: int, text: str | None, finish: str | None, first: bool = False, calls: list | None = None,
              reasoning: str = "") -> str:
        entries, carried[k] = carried[k], []
        logprobs = None
        if chat:
            delta = ({"role": choices[k].role, "content": ""} if first else {}) | ({"content": text} if text else {})
            if reasoning:  # vLLM's delta field (its reasoning parsers'), before the answer's
                delta["reasoning"] = reasoning
            if calls:
                delta["tool_calls"] = calls
            if want_logprobs and not first:
                logprobs = {"content": chat_logprobs(pieces, entries, as_ids), "refusal": None}
            choice = {"index": choices[k].index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            if want_logprobs:
                logprobs = completion_logprobs(pieces, entries, offsets[k], as_ids)
            choice = {"index": choices[k].index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        out = {"id": reply_id, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        if body.include_usage():  # OpenAI's null before the usage chunk; vLLM's continuous_usage_stats: so far
            out["usage"] = _usage_so_far(choices) if body.continuous_usage() else None
        return sse(out)

    try:
        if chat:
            for k in range(len(choices)):
                yield chunk(k, None, None, first=True)
        left, started = len(choices), [False] * len(choices)
        while left:
            k, event = await queue.get()
            choice, splitter = choices[k], splitters[k]
            if event.finish_reason in ("error", "cancelled"):
                yield sse(_failure(event).body())
                break
            carried[k] += choice.add(event)
            text = splitter.push(event.text) if splitter is not None else event.text
            thought = _reasoning_since(splitter)
            if not started[k]:
                text, started[k] = choice.echo + text, True
            if text or thought:
                yield chunk(k, text, None, reasoning=thought)
            if event.finish_reason is not None:
                left -= 1
                finish = event.finish_reason
                if splitter is not None:
                    tail, calls = splitter.finish()
                    thought = _reasoning_since(splitter)
                    if tail or thought:
                        yield chunk(k, tail, None, reasoning=thought)
                    for index, call in enumerate(choice.tools.shape(calls)):  # each call whole, in its own chunk
                        yield chunk(k, None, None, calls=[{"index": index, **call}])
                    finish = "tool_calls" if calls else finish
                yield chunk(k, None, finish)
        else:
            if body.include_usage():
                yield sse({"id": reply_id, "object": kind, "created": created, "model": body.model,
                            "choices": [], "usage": _usage(choices)})
        yield "data: [DONE]\n\n"
    except Exception as exc:  # a bug, not bad input: the stream ends with an error object, as OpenAI's and vLLM's do
        log.exception("%s stream %s failed", "Chat completions" if chat else "Completions", reply_id)
        yield sse(_internal(exc).body())
        yield "data: [DONE]\n\n"
    finally:
        _cancel(choices)  # the client went away mid-stream: free the rows at the next step


async def _response_events(queue: asyncio.Queue, choice: _Choice, writer: ResponseWriter,
                           run: BackgroundRun | None = None) -> AsyncIterator[str]:
    """A Responses stream: the reply's reasoning item and its text deltas (a reasoning model's, as they come), its
    message item (opened at its first text) and text deltas, then its function calls (each whole), then
    ``response.completed`` (or ``response.incomplete``) with the whole response.

    A background response (``run`` given) is ``queued`` (``response.created``, ``response.queued``) until its
    row's first token comes, then ``in_progress``; each state is handed to the writer's ``keep``. Meanwhile its
    message item (``in_progress`` too) is ``run.streaming``, which each delta is appended to (nothing re-saved or
    copied): a retrieve shows the text streamed so far (:meth:`StoredResponse.current`).

    A failure (the row's, or an internal error: a bug) ends the stream with ``error`` and ``response.failed``, the
    response keeping the message streamed so far (:func:`~qlora.serve.responses.partial_output`)."""
    splitter = choice.tools.splitter() if choice.tools is not None else None
    at = {"item_id": writer.message_id, "output_index": 0}
    thinking = {"item_id": writer.reasoning_id, "output_index": 0, "content_index": 0}
    background = run is not None
    streamed: StreamedMessage | None = None  # the message's text and logprobs as streamed, from its first piece
    opened, carried, calls, output, thoughts = False, [], [], [], []
    try:
        if background:
            yield writer.event("response.created", response=writer.state("queued", []))
            yield writer.event("response.queued", response=writer.state("queued", []))
        else:
            yield writer.event("response.created", response=writer.state("in_progress", []))
            yield writer.event("response.in_progress", response=writer.state("in_progress", []))
        started = not background
        while True:
            _, event = await queue.get()
            if not started:
                started = True
                yield writer.event("response.in_progress", response=writer.state("in_progress", []))
            if event.finish_reason in ("error", "cancelled"):
                error = _failure(event)
                for ending in writer.failure(error.message, error.code, partial_output(streamed)):
                    yield ending
                return
            choice.add(event)
            carried += event.logprobs
            piece = splitter.push(event.text) if splitter is not None else event.text
            thought = _reasoning_since(splitter)
            if event.finish_reason is not None and splitter is not None:
                tail, parsed = splitter.finish()
                piece, calls = piece + tail, choice.tools.shape(parsed)
                thought += _reasoning_since(splitter)
            if thought:
                if not thoughts:
                    yield writer.event("response.output_item.added", output_index=0,
                                       item=writer.reasoning("", "in_progress"))
                    yield writer.event("response.content_part.added", **thinking,
                                       part={"type": "reasoning_text", "text": ""})
                thoughts.append(thought)
                yield writer.event("response.reasoning_text.delta", **thinking, delta=thought)
            ends = event.finish_reason is not None
            if thoughts and not output and (piece or ends or calls):  # the reasoning is over: its item closes
                item = writer.reasoning("".join(thoughts), "completed" if piece or calls
                                        else writer.status(event.finish_reason, calls))
                yield writer.event("response.reasoning_text.done", **thinking, text=item["content"][0]["text"])
                yield writer.event("response.content_part.done", **thinking, part=item["content"][0])
                yield writer.event("response.output_item.done", output_index=0, item=item)
                output.append(item)
                at["output_index"] = 1
            if not opened and (piece or (ends and not calls)):  # an empty reply too
                opened = True
                yield writer.event("response.output_item.added", output_index=at["output_index"],
                                   item=writer.message("", "in_progress", []) | {"content": []})
                yield writer.event("response.content_part.added", **at, content_index=0,
                                   part=writer.text_part("", []))
            if piece:
                logprobs, carried = writer.logprobs(carried), []
                if streamed is None:
                    streamed = StreamedMessage(writer)
                    if run is not None:
                        run.streaming = streamed
                streamed.add(piece, logprobs)  # kept before the client hears of it: a read shows this text at least
                yield writer.event("response.output_text.delta", **at, content_index=0, delta=piece,
                                   logprobs=logprobs)
            if event.finish_reason is not None:
                break
        status = writer.status(choice.last.finish_reason, calls)
        text = "" if streamed is None else streamed.text()
        if opened:
            message = writer.message(text, status, writer.logprobs(choice.logprobs))
            yield writer.event("response.output_text.done", **at, content_index=0, text=text,
                               logprobs=message["content"][0]["logprobs"])
            yield writer.event("response.content_part.done", **at, content_index=0, part=message["content"][0])
            yield writer.event("response.output_item.done", output_index=at["output_index"], item=message)
            output.append(message)
        for call in calls:
            item, where = writer.call(call), {"output_index": len(output)}
            yield writer.event("response.output_item.added", **where,
                               item=item | {"arguments": "", "status": "in_progress"})
            yield writer.event("response.function_call_arguments.delta", **where, item_id=item["id"],
                               delta=item["arguments"])
            yield writer.event("response.function_call_arguments.done", **where, item_id=item["id"],
                               name=item["name"], arguments=item["arguments"])
            yield writer.event("response.output_item.done", **where, item=item)
            output.append(item)
        yield writer.event(f"response.{status}", response=writer.state(status, output, _usage([choice])))
    except Exception as exc:  # a bug, not bad input: the response fails (as OpenAI's do) rather than breaks off
        log.exception("Responses stream %s failed", writer.id)
        for ending in writer.failure(_internal(exc).message, "server_error", partial_output(streamed)):
            yield ending
    finally:
        _cancel([choice])  # the client went away mid-stream: free the row at the next step


def _reasoning_since(splitter: Splitter | None) -> str:
    """The reply's reasoning the splitter read since it was last asked ('' where it reads none: tool calls alone)."""
    return splitter.take_reasoning() if hasattr(splitter, "take_reasoning") else ""


def _usage(choices: list[_Choice]) -> dict[str, int]:
    """Token counts of the whole reply: each prompt once, every choice's tokens."""
    prompt = sum(c.last.prompt_tokens for c in choices if c.first and c.last is not None)
    completion = sum(c.last.completion_tokens for c in choices if c.last is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _usage_so_far(choices: list[_Choice]) -> dict[str, int]:
    """:func:`_usage` of a reply still streaming: each prompt once, the tokens every choice has sent."""
    prompt = sum(len(c.generation.prompt_ids) for c in choices if c.first)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _internal(exc: Exception) -> APIError:
    """A bug's error as a client reads it: a 500 ``server_error`` naming the exception."""
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", kind="server_error")


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry.", kind="server_error", code="server_shutdown")


def _failure(event: Event) -> APIError:
    if event.finish_reason == "cancelled":
        return _shutting_down()
    return APIError(500, f"Generation failed: {event.error}", kind="server_error", code="generation_failed")


def _raise_failure(event: Event) -> None:
    if event.finish_reason in ("error", "cancelled"):
        raise _failure(event)
