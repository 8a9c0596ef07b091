"""``qlora generate``: stream a model's continuation of one prompt to stdout.

Also home of the model options that ``qlora chat`` shares (--model, --adapter,
--quant and the sampling options).
"""

from __future__ import annotations

import argparse
import sys

from ...errors import UsageError
from ..base_model import adapter_names, add_load_options

NAME = "generate"
HELP = "stream a model's continuation of a prompt, with sampling options"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --adapter, --quant and the sampling options of ``SamplingOptions``."""
    from ...infer.sampling_options import BIAS_RANGE, GENERATE_FIELDS, cli_fields
    from ...template_names import TEMPLATE_NAMES
    from ..image_pixels import add_pixel_arguments
    from ..options import add_template_kwargs_option, add_template_option, id_value, number

    parser.add_argument("--model", help="model folder (transformers checkpoint) or hub id (default: the base the first "
                                          "--adapter folder's adapter_config.json names)")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="LoRA adapter directory (PEFT format); repeat for several on one base (NAME defaults "
                             "to the folder name, dots made _). Without --adapter-weights, generate continues the "
                             "prompt once per adapter and chat uses the first")
    parser.add_argument("--adapter-weights", metavar="W1,W2,...",
                        help="combine the adapters linearly with these weights (one per --adapter)")
    add_template_option(parser, TEMPLATE_NAMES, "chat format of the prompt: auto = the one the adapter was trained "
                        "with (its chat_format.json: template, date, system handling), else the model's own for chat "
                        "and the raw --prompt for generate; tokenizer = the model's own; none = raw text (generate)")
    add_template_kwargs_option(parser, "--chat-template-kwargs", "variables the chat template is rendered with, over "
                               "those the adapter was trained with (its chat_format.json)")
    add_load_options(parser)
    for f in cli_fields():
        kind = int if f.name in ("max_new_tokens", "top_k", "seed") else float
        shipped = f.name in GENERATE_FIELDS  # left out: the model's generation_config value, else qlora's default
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=number(kind, f.metadata["range"]),
                            default=None if shipped else f.default,
                            help=f.metadata["help"] + (f"; default: the model's generation_config value, else "
                                                       f"{f.default}" if shipped else ""))
    parser.add_argument("--logit-bias", action="append", default=[], type=id_value(BIAS_RANGE), metavar="ID=BIAS",
                        help="add BIAS (in [-100, 100]) to the logit of token ID before sampling (OpenAI's logit_bias: "
                             "100 all but forces the token, -100 bans it); repeat for several tokens")
    add_pixel_arguments(parser)


def sampling_options(args: argparse.Namespace, model=None):
    """The ``SamplingOptions`` given on the command line; an option left out takes ``model``'s generation_config
    value (:func:`~qlora.infer.sampling_options.model_defaults`; no model: checks the options before a load),
    else qlora's default."""
    from ...infer.sampling_options import SamplingOptions, cli_fields, merged, model_defaults

    given = {f.name: getattr(args, f.name) for f in cli_fields() if getattr(args, f.name) is not None}
    shipped = model_defaults(model) if model is not None else {}
    return SamplingOptions(**merged(shipped, given), logit_bias=dict(args.logit_bias))


def load_model_from_args(args: argparse.Namespace, keep_base: bool = False):
    """``(model, tokenizer)`` for --model/--quant/--compute-dtype, with --adapter applied; ``keep_base``: also one
    adapter keeps the modules it trained whole as copies beside the base's (:func:`load_adapter`), as several
    always do."""
    from ...cpu_threads import apply_cpu_threads
    from ...infer.generate import decode_problem
    from ...model.adapter_io import adapter_tokenizer, load_adapter
    from ...model.load import load_model
    from ...model.multi_adapter import set_adapters
    from ..base_model import load_kwargs

    names = adapter_names(args)  # options are checked before the (slow) model load
    weights = _weights(args) if getattr(args, "adapter_weights", None) is not None else None  # generate/chat only
    model, tokenizer = load_model(args.model, **load_kwargs(args), compute_dtype=args.compute_dtype)
    problem = decode_problem(model)
    if problem:
        raise UsageError(f"--model {args.model}: qlora cannot decode this model ({type(model).__name__}): {problem}. "
                         "Use transformers' own generate for it; training, merging and quantizing it work as usual.")
    apply_cpu_threads(model, next(model.parameters()).device)
    tokenizer = adapter_tokenizer(list(names.values()), tokenizer)
    for token, _ in getattr(args, "logit_bias", ()):  # generate/chat only
        if token >= len(tokenizer):
            raise UsageError(f"--logit-bias {token}=...: the tokenizer of {args.model} has token ids 0 to "
                             f"{len(tokenizer) - 1}; give a token id from it")
    for name, path in names.items():  # one adapter alone holds what it trained whole once, in the base
        load_adapter(model, path, adapter_name=name, keep_base=len(names) > 1 or keep_base)
    if weights is not None:
        set_adapters(model, dict(zip(names, weights)))
    return model.eval(), tokenizer


def chat_format_from_args(args: argparse.Namespace, tokenizer, command: str):
    """The :class:`ChatFormat` to prompt with, or ``None`` for raw text (generate) / the tokenizer's own (chat).

    ``--template auto`` takes the format saved with the first --adapter, else the one ``qlora merge`` saved in
    the model folder; an adapter trained before formats were saved falls back as before (raw prompt for generate, the tokenizer's template for chat).
    Another template keeps the rest of that saved format (:meth:`ChatFormat.keeping`).
    """
    from ...model.chat_format import ChatFormat, merged_format
    from ...train.data import fallback_note, own_template, resolve_chat_format

    if args.template == "none":
        if command == "chat":
            raise UsageError("qlora chat --template none: a chat needs a chat template; use auto, tokenizer or "
                             "a built-in one, or your own Jinja template.")
        return None
    saved = [ChatFormat.load(path) for path in adapter_names(args).values()]
    if args.template == "auto":
        if saved and saved[0] is not None:
            if any(f != saved[0] for f in saved[1:]):
                print("note: the adapters were trained with different chat formats; prompting in the first one's "
                      f"({saved[0].origin})", file=sys.stderr)
            return saved[0]
        merged = merged_format(args.model)
        if merged is not None:
            return merged
        if command == "chat" and own_template(tokenizer) is None:
            print(fallback_note(tokenizer), file=sys.stderr)
            return resolve_chat_format(tokenizer, "auto")
        return None
    trained = saved[0] if saved and saved[0] is not None else merged_format(args.model)  # kept under the chosen one
    return resolve_chat_format(tokenizer, args.template).keeping(trained)


def pixel_bounds_from_args(args: argparse.Namespace):
    """The pixel bounds of the images given: the first --adapter's (saved with it), else those ``qlora merge``
    saved in the model folder, with --image-max-pixels/--image-min-pixels replacing them."""
    from ..image_pixels import pixel_bounds_for

    adapters = list(adapter_names(args).values())
    bounds = [pixel_bounds_for(args, path) for path in adapters] or [pixel_bounds_for(args, None)]
    if any(b != bounds[0] for b in bounds[1:]):
        print("note: the adapters were trained with different image pixel bounds; showing the images as the first "
              f"one's ({adapters[0]}) were", file=sys.stderr)
    return bounds[0]


def _weights(args: argparse.Namespace) -> list[float]:
    import math

    from ...errors import UsageError

    try:
        weights = [float(w) for w in args.adapter_weights.split(",")]
        if not all(math.isfinite(w) for w in weights):
            raise ValueError
    except ValueError:
        raise UsageError(f"--adapter-weights must be comma-separated numbers, got {args.adapter_weights!r}") from None
    if len(weights) != len(args.adapter):
        raise UsageError(f"--adapter-weights has {len(weights)} values for {len(args.adapter)} adapters")
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True,
                        help="the prompt: sent as one user message in the chat format of --template (by default the "
                             "adapter's training format), or continued as raw text with --template none or an "
                             "adapter saved without a format; '-' reads it from standard input (a long or "
                             "multi-line prompt: qlora generate ... --prompt - < prompt.txt)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for a vision-language model (a file or a data: URI; repeat for several): the "
                             "images go at the <image> placeholders of --prompt, one each, else before its text, and "
                             "the prompt is sent as a user message in the chat format")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="end the continuation before this text (repeat for several), as the 'stop' of "
                             "qlora serve and OpenAI's API")


def run(args: argparse.Namespace) -> int:
    from ...chat.prefix_lm import prefix_type
    from ...chat.prefix_suffix import image_prompt
    from ...infer.generate import default_stop_ids, generate_per_adapter, stream_text
    from ...infer.reply_reading import ReplyReader, ReplyText
    from ...infer.template import chat_template, render_chat, stop_token_ids
    from ...infer.turn_end import turn_end_stops
    from ..reasoning_echo import ReasoningEcho, show_answer
    from ..utf8_text import stdin_text

    options = sampling_options(args)  # checked before the (slow) model load
    if args.prompt == "-":
        args.prompt = stdin_text("--prompt")
    if not args.prompt.strip() and not args.image:
        raise UsageError("--prompt is empty; give the text to continue (or '-' with the text on standard input).")
    if args.chat_template_kwargs is not None and args.template == "none":
        raise UsageError("--chat-template-kwargs with --template none: the variables go to a chat template, and "
                         "none continues the raw prompt; choose a chat format with --template, or leave out "
                         "--chat-template-kwargs.")
    user = _user_message(args)  # images checked before the (slow) model load
    bounds = pixel_bounds_from_args(args) if user.images else None
    model, tokenizer = load_model_from_args(args)
    options = sampling_options(args, model)
    fmt = chat_format_from_args(args, tokenizer, "generate")
    processor = None
    if user.images:
        from ...infer.images import image_processor

        processor = image_processor(model, tokenizer, args.model, f"--image {args.image[0]}", bounds=bounds)
    # images, and template variables, go into a user turn of the model's own template; a prefix-LM's (PaliGemma's)
    # images go before the prompt as its processor takes them, as it trained on them
    prefix_images = bool(user.images) and prefix_type(model) is not None
    chat = not prefix_images and (fmt is not None or bool(user.images) or args.chat_template_kwargs is not None)
    prompt = render_chat(tokenizer, [user], chat_format=fmt, template_kwargs=args.chat_template_kwargs) if chat \
        else image_prompt(processor, [user.as_dict()]) if prefix_images else args.prompt
    stops = stop_token_ids(model, tokenizer) if chat else default_stop_ids(model, tokenizer)
    # a turn end this vocabulary spells as text (ChatML without an <|im_end|> token) ends the reply as --stop would
    stop_strings = [*args.stop, *(turn_end_stops(tokenizer, stops, fmt, args.chat_template_kwargs) if chat else ())]
    media = dict(images=user.images, processor=processor)
    # a chat reply is decoded with the markup of its reasoning (or of gpt-oss's channels), and its answer is shown
    reader, template = ReplyReader(tokenizer), chat_template(tokenizer, fmt)
    keep = reader.keep(template, fmt, args.chat_template_kwargs) if chat else frozenset()

    def splitter():
        return reader.splitter(prompt, template, fmt, args.chat_template_kwargs) if chat else None

    if len(args.adapter) > 1 and not args.adapter_weights:
        # One batch, one row per adapter: the base is read once per step for all of them.
        names = list(adapter_names(args))
        replies = generate_per_adapter(model, tokenizer, prompt, names, options, stops, stop_strings=stop_strings,
                                       chat=chat, keep=keep, **media)
        for name, text in zip(names, replies):
            echo = ReasoningEcho(f"[{name}] ")
            text = "".join(ReplyText([text], splitter(), echo))
            echo.end()
            sys.stdout.write(f"[{name}] {text}\n")
        return 0
    echo = ReasoningEcho()  # the answer on stdout, its reasoning on stderr
    show_answer(ReplyText(stream_text(model, tokenizer, prompt, options, stops, keep=keep, stop_strings=stop_strings,
                                      chat=chat, **media), splitter(), echo), echo)
    return 0


def _user_message(args: argparse.Namespace):
    """--prompt as a user message, with the --image files (each resolved and checked)."""
    from ...chat.images import resolve_image
    from ...infer.messages import Message

    images = tuple(resolve_image(source, "--image") for source in args.image)
    if images and args.template == "none":
        raise UsageError("--image with --template none: images go into a user turn of a chat template; use "
                         "--template auto (the adapter's format, else the model's own) or tokenizer.")
    try:
        return Message("user", args.prompt, images=images)
    except UsageError as exc:
        raise UsageError(f"--prompt: {exc}") from None
