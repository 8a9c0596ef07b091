"""``qlora serve``: the OpenAI HTTP API for a model and its adapters.

Each ``--adapter NAME=DIR`` is served as model id NAME, the base alone as the
model folder's name (or ``--served-model-name``). Concurrent requests are
decoded together in one batch, whatever adapters they ask for.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from ...errors import UsageError

NAME = "serve"
HELP = "serve a model and its adapters over the OpenAI HTTP API"
STOPPED_BY_SIGTERM = True  # run as a service (systemd, docker stop): SIGTERM stops it as Ctrl-C does

INSTALL_HINT = "FastAPI and uvicorn are not installed; install them with: pip install 'qlora[serve]'"
MAX_REQUEST_BYTES = 100 << 20  # qlora.serve.request_size.DEFAULT_MAX_REQUEST_BYTES, not imported for --help


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...option_range import Range
    from ...template_names import TRAIN_TEMPLATE_NAMES
    from ..base_model import add_load_options
    from ..image_pixels import add_pixel_arguments
    from ..options import add_template_kwargs_option, add_template_option, non_negative_int, number, positive_int

    parser.add_argument("--model", help="model folder (transformers checkpoint) or hub id (default: the base the first "
                                          "--adapter folder's adapter_config.json names)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="LoRA adapter directory (PEFT format), served as model id NAME (default: the folder "
                             "name); repeat for several adapters on the one base")
    add_load_options(parser)
    add_template_option(parser, TRAIN_TEMPLATE_NAMES, "chat format of /v1/chat/completions: auto = each adapter's "
                        "own (its chat_format.json, the format it was trained with), else the model's own template; "
                        "or one format for all")
    add_template_kwargs_option(parser, "--default-chat-template-kwargs", "variables every chat request's template is "
                               "rendered with (over those each adapter was trained with; a request's "
                               "chat_template_kwargs are merged over them, as in vLLM)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 exposes the server")
    parser.add_argument("--port", type=number(int, Range(0, 65535)), default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request (default: $QLORA_API_KEY)")
    parser.add_argument("--served-model-name", help="model id of the base model (default: the model folder's name)")
    parser.add_argument("--max-batch-size", type=positive_int, default=32,
                        help="requests decoded together at most; more wait for a free row")
    parser.add_argument("--max-model-len", type=number(int, Range(2)),
                        help="context length (prompt + reply) in tokens (default: the model's)")
    parser.add_argument("--max-request-bytes", type=non_negative_int, default=MAX_REQUEST_BYTES, metavar="N",
                        help="a request body over this many bytes is answered 413 before it is read whole (room for "
                             "OpenAI's 50 MB of images a request, base64-encoded; 0: no limit). A prompt text whose "
                             "first part alone has more tokens than the context is refused (400) without tokenizing "
                             "the rest")
    parser.add_argument("--stored-responses", type=non_negative_int, default=1000, metavar="N",
                        help="Responses API responses kept in memory for previous_response_id and GET "
                             "/v1/responses/{id} (the least recently used dropped first, never a background response "
                             "still running; 0 keeps none)")
    parser.add_argument("--stored-conversations", type=non_negative_int, default=1000, metavar="N",
                        help="conversations (/v1/conversations, the Responses API's 'conversation') kept in memory, "
                             "until the server restarts (the least recently used dropped first; 0 keeps none)")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="render a chat request's own 'chat_template' (a Jinja template, in transformers' "
                             "sandbox) instead of the model's, as vLLM's option of this name; off: such a request "
                             "is refused")
    parser.add_argument("--allow-adapter-updates", action="store_true",
                        help="serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which load and "
                             "unload adapters while serving (any folder this process can read, by its path: keep "
                             "the server private or set --api-key); off: both answer 404")
    parser.add_argument("--allowed-origins", metavar="ORIGINS",
                        help="web pages allowed to call the server from a browser (CORS), as vLLM's option: origins "
                             "as browsers send them, comma-separated or a JSON list, e.g. http://localhost:3000, or "
                             "* for any page (default: none, so no website the browser opens can use the model; vLLM "
                             "allows *)")
    parser.add_argument("--allowed-methods", default="*", metavar="METHODS",
                        help="HTTP methods those pages may use, comma-separated or a JSON list (default: *)")
    parser.add_argument("--allowed-headers", default="*", metavar="HEADERS",
                        help="request headers those pages may send, comma-separated or a JSON list (default: *)")
    parser.add_argument("--allow-credentials", action="store_true",
                        help="let those pages send cookies and HTTP authentication (the API key is a header, "
                             "allowed by --allowed-headers, and needs no credentials)")
    add_pixel_arguments(parser)
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's log level (info logs each request)")


def model_context_length(model, tokenizer) -> int | None:
    """The longest sequence the model takes: its position table, or the tokenizer's limit."""
    from ...model.position_limit import learned_position_limit

    config = model.config
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limits += [getattr(tokenizer, "model_max_length", None), learned_position_limit(model)]  # RoBERTa's 514 rows: 512
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 10**8]
    return min(limits) if limits else None


def chat_formats(args: argparse.Namespace, tokenizer) -> dict:
    """Adapter name (``None``: the base) -> the ChatFormat its chat requests are rendered with.

    With ``--template auto`` each adapter prompts in the format it was trained with (a model
    trained on Alpaca text answers Alpaca prompts), and the base the one ``qlora merge`` saved with it;
    other bases and older adapters use the model's own. Another template keeps the rest of each saved format
    (:meth:`ChatFormat.keeping`: its date, the variables the template reads, its system folding), as generate does.
    """
    from ...model.chat_format import ChatFormat, merged_format
    from ...train.data import fallback_note, own_template, resolve_chat_format
    from ..base_model import adapter_names

    formats = {name: ChatFormat.load(path) for name, path in adapter_names(args).items()}
    merged = merged_format(args.model)
    if args.template != "auto":
        chosen = resolve_chat_format(tokenizer, args.template)
        return {name: chosen.keeping(saved) for name, saved in {None: merged, **formats}.items()}
    if merged is not None:
        formats = {None: merged, **formats}
    if own_template(tokenizer) is None and (not formats or None in formats.values()):
        print(fallback_note(tokenizer), file=sys.stderr)  # the base and older adapters need a format too
        fallback = resolve_chat_format(tokenizer, "auto")
        formats = {None: fallback, **{name: fmt or fallback for name, fmt in formats.items()}}
    return formats


def pixel_bounds(args: argparse.Namespace) -> dict:
    """Adapter name (``None``: the base) -> the pixel bounds of the images its requests send: each adapter's own
    (saved with it), the base's those ``qlora merge`` saved in the model folder (none elsewhere), with
    --image-max-pixels/--image-min-pixels replacing them."""
    from ..base_model import adapter_names
    from ..image_pixels import pixel_bounds_for

    return {None: pixel_bounds_for(args, None),
            **{name: pixel_bounds_for(args, path) for name, path in adapter_names(args).items()}}


def adapter_settings(args: argparse.Namespace, tokenizer) -> Callable[[Path], tuple]:
    """The function giving an adapter loaded while serving (``--allow-adapter-updates``) its chat format and pixel
    bounds, chosen as :func:`chat_formats` and :func:`pixel_bounds` choose those of an ``--adapter``."""
    from ...model.chat_format import ChatFormat
    from ...train.data import own_template, resolve_chat_format
    from ..image_pixels import pixel_bounds_for

    fixed = None if args.template == "auto" else resolve_chat_format(tokenizer, args.template)
    fallback = resolve_chat_format(tokenizer, "auto") if fixed is None and own_template(tokenizer) is None else None

    def settings(folder: Path) -> tuple:
        saved = ChatFormat.load(folder)
        chosen = fixed.keeping(saved) if fixed is not None else saved
        return chosen or fallback, pixel_bounds_for(args, folder)

    return settings


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UsageError(INSTALL_HINT)
    from ...infer.batcher import ContinuousBatcher
    from ...model.in_place_weights import in_place_adapter
    from ...serve import cors
    from ...serve.app import build_app
    from ...serve.server import LOOPBACK, bind, make_server
    from ..base_model import adapter_names
    from .generate import load_model_from_args

    if args.api_key is None:  # an empty $QLORA_API_KEY means no key, as if unset
        args.api_key = os.environ.get("QLORA_API_KEY") or None
    origins = cors.origins(args.allowed_origins)  # checked before the (slow) model load
    methods, headers = cors.methods(args.allowed_methods), cors.tokens(args.allowed_headers, "--allowed-headers")
    names = list(adapter_names(args))
    base_id = args.served_model_name or Path(args.model.rstrip("/")).name
    if base_id in names:
        raise UsageError(f"the adapter name {base_id!r} is also the base model's id; rename the adapter "
                         "(--adapter NAME=DIR) or the base (--served-model-name)")
    bounds = pixel_bounds(args)  # checked before the (slow) model load
    model, tokenizer = load_model_from_args(args, keep_base=args.allow_adapter_updates)  # whole for later adapters
    context = model_context_length(model, tokenizer)
    if args.max_model_len is not None:
        if args.max_model_len < 2 or (context is not None and args.max_model_len > context):
            raise UsageError(f"--max-model-len must lie between 2 and the model's context ({context}), "
                             f"got {args.max_model_len}")
        context = args.max_model_len
    if context is None:
        raise UsageError("the model's config gives no context length; pass --max-model-len")
    formats = chat_formats(args, tokenizer)
    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=args.max_batch_size, context_length=context)
    app = build_app(batcher.start(), base_id, names, api_key=args.api_key or None, chat_formats=formats,
                    stored_responses=args.stored_responses, stored_conversations=args.stored_conversations,
                    model_dir=args.model, pixel_bounds=bounds,
                    trust_request_chat_template=args.trust_request_chat_template,
                    template_kwargs=args.default_chat_template_kwargs,
                    adapter_settings=adapter_settings(args, tokenizer) if args.allow_adapter_updates else None,
                    max_request_bytes=args.max_request_bytes)
    cors.allow(app, origins, methods, headers, args.allow_credentials)
    try:
        sock = bind(args.host, args.port)
    except OSError as exc:
        batcher.close()
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror}; choose another --port "
                         "or --host") from None
    port = sock.getsockname()[1]
    if args.host not in LOOPBACK and not args.api_key:
        print(f"qlora serve: warning: listening on {args.host} without --api-key: anyone who reaches this "
              "address can use the model" + (" and load adapters from this machine's folders (--allow-adapter-updates)"
                                             if args.allow_adapter_updates else ""), file=sys.stderr)
    if batcher.unbatchable:
        print(f"qlora serve: warning: continuous batching is off for this model ({batcher.unbatchable}); "
              "requests are decoded one at a time, in order of arrival", file=sys.stderr)
    per_batch = 1 if batcher.unbatchable else args.max_batch_size
    served = names if in_place_adapter(model) else [base_id, *names]  # see build_app
    print(f"qlora serve: http://{args.host}:{port}/v1 serving {', '.join(served)} "
          f"(context {context} tokens, up to {per_batch} requests per batch)", file=sys.stderr, flush=True)
    try:  # SIGTERM is an interrupt from qlora.cli.main's start (STOPPED_BY_SIGTERM)
        make_server(app, log_level=args.log_level, on_shutdown=batcher.close).run(sockets=[sock])
    except KeyboardInterrupt:  # the normal way to stop (Ctrl-C or SIGTERM)
        print("qlora serve: stopped", file=sys.stderr)
    finally:
        batcher.close()
        sock.close()
    return 0
