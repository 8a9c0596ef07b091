"""Entry point of the ``qlora`` command.

Each sub-command lives in its own module under ``qlora.cli.commands`` and
exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``qlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..errors import UsageError, describe_os_error
from .launch import INTERRUPTED, keep_frames, raised_within, report_error
from .options import HelpFormatter, check_blank_values
from .utf8_text import check_utf8_values

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("qlora.cli.commands.estimate", "memory needed to fine-tune a model: full, 16-bit LoRA and QLoRA"),
    "train": ("qlora.cli.commands.train", "QLoRA-fine-tune a model on a dataset (YAML config and/or flags)"),
    "eval": ("qlora.cli.commands.eval", "loss and perplexity of a model (+ adapter) on a dataset"),
    "merge": ("qlora.cli.commands.merge", "fold an adapter into its base: a standard 16-bit HF checkpoint"),
    "quantize": ("qlora.cli.commands.quantize", "write a bitsandbytes-format 4-bit checkpoint"),
    "export": ("qlora.cli.commands.export", "write a model (+ adapter, merged) as GGUF for llama.cpp / Ollama, with a Modelfile"),
    "demo": ("qlora.cli.commands.demo", "build, QLoRA-train and query a tiny model in about a minute on a CPU"),
    "quant-error": ("qlora.cli.commands.quant_error", "quantization error of NF4/FP4/INT4 and bits per parameter"),
    "generate": ("qlora.cli.commands.generate", "stream a model's continuation of a prompt, with sampling options"),
    "chat": ("qlora.cli.commands.chat", "multi-turn chat with a model, with conversation memory persisted in SQLite"),
    "serve": ("qlora.cli.commands.serve", "serve a model and its adapters over the OpenAI HTTP API"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; a usage line, no traceback
        usage = self.format_usage()
        if usage.count("\n") > 1:  # a command's whole option list would bury the one line that matters
            usage = f"usage: {self.prog} [options] ({self.prog} --help lists them)\n"
        sys.stderr.write(usage)
        if message.startswith("unrecognized arguments:"):
            parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                                for p in a.choices.values()]
            known = list(dict.fromkeys(o for p in parsers for a in p._actions for o in a.option_strings
                                       if o not in ("-h", "--help")))
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], known, n=3, cutoff=0.6)
                alias = _alias(word.split("=")[0])
                if alias and alias in known:
                    close = [alias]
                if close:
                    message += f" (did you mean {', '.join(close)} for {word}?)"
        value_flag = re.fullmatch(r"argument (?:\S+/)?(--[\w-]+): expected one argument", message)
        if value_flag:  # argparse reads a value that begins with '-' ("-5GB", "- item") as another option
            flag = value_flag.group(1)
            message += f" (if it was given one that begins with '-', write {flag}=VALUE, e.g. {flag}=-5GB)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _alias(flag: str) -> str | None:
    """``--lr`` for ``--learning-rate``: the flag of a PEFT/TRL/axolotl/LLaMA-Factory key, if we have one."""
    if not flag.startswith("--"):
        return None
    from ..train.config import canonical_name

    name = canonical_name(flag[2:])
    return "--" + name.replace("_", "-") if name != flag[2:].replace("-", "_") else None


# transformers' HfArgumentParser reads these as booleans (``string_to_bool``), plus on/off
_TRUE, _FALSE = {"true", "t", "yes", "y", "1", "on"}, {"false", "f", "no", "n", "0", "off"}


def _boolean_values(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> list[str]:
    """``--packing true``, ``--progress=False`` (how transformers' and TRL's scripts take booleans) as
    ``--packing``, ``--no-progress``: argparse's on/off flags take no value, and the word would otherwise be
    read as the command's positional argument. A plain switch (``--overwrite``) given false is left out."""
    sub = sub_parser(parser, command)
    flags = {o: f"--no-{o[2:]}" for a in sub._actions if isinstance(a, argparse.BooleanOptionalAction)
             for o in a.option_strings if not o.startswith("--no-")}
    flags.update({o: None for a in sub._actions if isinstance(a, argparse._StoreTrueAction) for o in a.option_strings
                  if o.startswith("--")})
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        i += 1
        if flag not in flags:
            out.append(argv[i - 1])
            continue
        if not eq and i < len(argv) and argv[i].lower() in _TRUE | _FALSE:
            value, i = argv[i], i + 1
        elif not eq:
            out.append(flag)
            continue
        off = flags[flag]
        if value.lower() not in _TRUE | _FALSE:
            parser.exit(2, f"qlora {command}: error: {flag} is on or off: give {flag} or "
                           f"{off or 'leave it out'} (or {flag} true/false), not {value!r}\n")
        if value.lower() in _TRUE or off:
            out.append(flag if value.lower() in _TRUE else off)
    return out


def _one_adapter(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> None:
    """``--adapter`` given twice to a command that takes one (eval, merge, export, train): generate, chat and serve
    load each one given, so a user may expect these to stack them, while argparse would keep the last alone."""
    action = next((a for a in sub_parser(parser, command)._actions if "--adapter" in a.option_strings), None)
    if action is None or isinstance(action, argparse._AppendAction):
        return
    given = [a for a in argv if a == "--adapter" or a.startswith("--adapter=")]
    if len(given) > 1:
        parser.exit(2, f"qlora {command}: error: --adapter is given {len(given)} times, and qlora {command} takes one "
                       "adapter (it would use the last alone). Give one; to fold several into a model, merge them "
                       "one after another (qlora merge --model FIRST_MERGED --adapter NEXT --output ...).\n")


def _unknown_before_missing(parser: argparse.ArgumentParser, command: str, argv: list[str]) -> None:
    """An unknown option is named (with the close ones) before a required one is missing: argparse says only
    "required: --prompt" for ``--promt hi``, the typo that left it out."""
    required = [a for a in sub_parser(parser, command)._actions if a.required]
    if not required:
        return
    for action in required:
        action.required = False
    try:
        _, unknown = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if unknown:
        sub_parser(parser, command).error(f"unrecognized arguments: {' '.join(unknown)}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora", description="Fine-tune large language models on one GPU with QLoRA.")
    parser.add_argument("--version", action="version", version=f"qlora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _open_closed_streams()
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"qlora: error: unknown command {command!r}{hint}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    if command is not None:
        argv = _boolean_values(parser, command, argv)
        _one_adapter(parser, command, argv)
        _unknown_before_missing(parser, command, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse says this from the top-level parser: the command's names it and lists its options
        (sub_parser(parser, args.command) if args.command else parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        from ..sigterm import interrupts_kept, sigterm_as_interrupt
        from .base_model import resolve_base

        # a command run as a service stops on SIGTERM as on Ctrl-C, at any point (its imports and load included)
        with (interrupts_kept(),
              sigterm_as_interrupt() if getattr(module, "STOPPED_BY_SIGTERM", False) else contextlib.nullcontext()):
            command_parser = sub_parser(parser, args.command)
            check_utf8_values(command_parser, args)
            if args.command != "train":  # train's flags and YAML keys are checked together (load_config)
                check_blank_values(command_parser, args)
            check_paths(args)
            resolve_base(args, args.command)
            try:
                return int(module.run(args) or 0)
            except BaseException as exc:
                keep_frames(exc)  # a rank's model is not freed as its error is handled below (see end_rank)
                raise
    except UsageError as exc:
        report_error(f"qlora {args.command}: error: {exc}")
        return exc.exit_code
    except OSError as exc:  # the environment, not the input: a full disk, a read-only folder
        report_error(f"qlora {args.command}: error: {describe_os_error(exc)}")
        return 1
    except (MemoryError, RuntimeError) as exc:
        # an interrupt wrapped by Python (in an import) or met by a clean-up failing while handling it
        if raised_within(exc, KeyboardInterrupt):
            report_error(INTERRUPTED)
            return 130
        if not _out_of_memory(exc):
            raise
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        report_error(f"qlora {args.command}: error: out of memory ({detail}). Lower the sizes asked for "
                     "(--batch-size, --seq-len, --rank, --max-batch-size, --numel), use a smaller model, or free "
                     "memory; files already completed were left as they were, nothing half-written was kept.")
        return 1
    except KeyboardInterrupt:  # a rank's word goes to its launcher, which says it once for all of them
        report_error(INTERRUPTED)
        return 130
    except AttributeError as exc:
        model_file = _transformers_inconsistency(exc)
        if model_file is None:
            raise
        transformers = sys.modules.get("transformers")
        release = getattr(transformers, "__version__", "installed")
        report_error(f"qlora {args.command}: error: the installed transformers' own forward failed for this model "
                     f"(transformers {release}, {model_file}): {type(exc).__name__}: {exc}. Its code asks one of "
                     "transformers' own objects for a field that object does not have: a fault of this transformers "
                     "release's code for this architecture, which no option of qlora or file of the model changes; "
                     "install another transformers release "
                     f"(pip install 'transformers!={release}'), or use another model.")
        return 2
    except ValueError as exc:
        model_file = _model_code_that_raised(exc)
        if model_file is None:
            raise
        detail = " ".join(str(exc).split())[:600] or type(exc).__name__
        missing = _inputs_not_given(exc)
        if missing:
            # an image among them: the error asks for one of them (Kosmos-2: "either pixel_values or image_embeds")
            needs = (f"{', '.join(missing[:-1])} or {missing[-1]} on every input, which a row without an image does "
                     "not give it" if "pixel_values" in missing else
                     f"{' and '.join(missing)}, which no command gives it")
            report_error(f"qlora {args.command}: error: the model's own code refused the input (transformers' "
                         f"{model_file}): {detail} Its forward needs {needs}: "
                         "qlora runs a model on token ids (and images only where the model also runs without "
                         "them), and this one takes what another model computes (a draft model for speculative "
                         "decoding is fed by its main model) or what an image gives on every input (Kosmos-2's "
                         "image features, Pix2Struct's patches), so it cannot be trained or run on text alone; use "
                         "the main model a draft belongs to, or another model.")
            return 2
        report_error(f"qlora {args.command}: error: the model's own code refused the input (transformers' {model_file}): "
                     f"{detail} This is a limit of how transformers implements this architecture, not of qlora; "
                     "change the option it points to (--seq-len, --batch-size, --packing, ...) or use another model.")
        return 2


def _open_closed_streams() -> None:
    """A standard stream the shell closed (``qlora chat <&-``) is None in Python, where reading or writing it fails
    with a traceback: it reads as empty (chat ends, ``--prompt -`` is empty) and takes writes as print does, to
    nowhere."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))


def sub_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command``, one of ``parser``'s sub-commands."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def check_paths(args: argparse.Namespace) -> None:
    """A mistyped ``--adapter`` or ``--model``, or a folder that holds no adapter or model, refused at once, before
    the seconds of imports that loading starts with. ``qlora train`` checks them with its other options, its YAML
    file's included (:meth:`qlora.train.config.TrainConfig.validate`)."""
    if args.command == "train":
        return
    from ..model.known_shapes import known_shape
    from ..model.local_path import check_adapter_path, check_model_path

    adapters = getattr(args, "adapter", None)
    for item in [adapters] if isinstance(adapters, str) else adapters or []:
        check_adapter_path(item, defer_hub_ids=True)  # a hub id's refusal after the other options' (load_kwargs)
    estimate = args.command == "estimate"  # a known model's name, or a config.json file, as well as a model folder
    adapter_ok = args.command != "quantize"  # the others load an adapter folder's base (quantize writes a base)
    for attr, option in (("model", "--model"), ("model_arg", "MODEL")):
        name = getattr(args, attr, None)
        if isinstance(name, str) and not (estimate and known_shape(name) is not None):
            check_model_path(name, option, adapter_ok=adapter_ok, file_ok=estimate)


def _model_code_that_raised(exc: BaseException) -> str | None:
    """``models/<arch>/<file>.py`` when ``exc`` was raised by a transformers model's own code (its checks of the
    input, such as Reformer's sequence length that must equal its axial position shape), else ``None``."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return None
    parts = Path(tb.tb_frame.f_code.co_filename).parts
    if len(parts) >= 4 and parts[-4:-2] == ("transformers", "models"):
        return "/".join(parts[-3:])
    return None


def _transformers_inconsistency(exc: AttributeError) -> str | None:
    """``models/<arch>/<file>.py`` when ``exc`` is transformers' model code asking one of transformers' own objects
    (an output, a config, a cache) for a field it lacks: 5.24's Llama 4 vision-language forward reads
    ``image_outputs`` from its text model's output on every input. An attribute missing from anything else (one of
    qlora's modules, a tensor, None) may be qlora's doing, and is left to surface as it is."""
    model_file = _model_code_that_raised(exc)
    owner = type(getattr(exc, "obj", None)).__module__
    return model_file if model_file is not None and owner.startswith("transformers.") else None


# What qlora's commands pass a forward: an error about another of its inputs being None is about one never given.
_GIVEN_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "labels", "cache", "past_key_values",
                           "use_cache", "cache_position", "pixel_values", "image_sizes", "image_grid_thw",
                           "logits_to_keep", "return_dict"})


def _inputs_not_given(exc: BaseException) -> list[str]:
    """The ``forward`` inputs that the innermost forward of the traceback of ``exc`` got as None and that the
    error names (Gemma 4's assistant: "inputs_embeds and shared_kv_states cannot be None"), except those qlora
    gives, and ``pixel_values`` beside them where the error names it too (IDEFICS: "Exactly 1 of pixel_values,
    image_encoder_embeddings or perceiver_embeddings"); ``[]`` when the error is about something else."""
    said = str(exc)
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    forward = next((f for f in reversed(frames) if f.f_code.co_name == "forward"), None)
    if forward is None:
        return []
    code = forward.f_code
    names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    named = [n for n in names if n != "self" and forward.f_locals.get(n, 0) is None
             and re.search(rf"\b{re.escape(n)}\b", said, re.IGNORECASE)]  # UDOP: "Bbox is required"
    missing = [n for n in named if n not in _GIVEN_INPUTS]
    return [n for n in named if n in missing or n == "pixel_values"] if missing else []


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: torch reports the CPU's as a ``RuntimeError``."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA)
        return True
    return "can't allocate memory" in str(exc) or "CUDA out of memory" in str(exc)


if __name__ == "__main__":
    raise SystemExit(main())
