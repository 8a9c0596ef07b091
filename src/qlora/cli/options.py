"""Checked option types for the ``qlora`` commands, declared with the options.

Every numeric flag is declared with :func:`number` as its argparse ``type``, so
``--batch-size 0`` or ``--top-p 2`` is refused when the command line is read
(exit 2, one line naming the flag and the allowed range), before anything
loads. :class:`HelpFormatter` shows the default, the choices and the range of
every option in ``--help``.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Sequence

from ..option_range import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range
from ..errors import UsageError
from ..template_file import is_custom, read_template
from ..template_kwargs import render_parameter
from ..template_names import TRAIN_TEMPLATE_NAMES, template_name


def number(kind: type = int, allowed: Range = Range()) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) within ``allowed``."""

    def parse(value: str):
        try:
            parsed = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"{allowed.text}, got {value!r}") from None
        if parsed not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed.text}, got {value}")
        return parsed

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.allowed = allowed
    return parse


def id_value(allowed: Range) -> Callable[[str], tuple[int, float]]:
    """An argparse type: ``ID=VALUE``, a token id (integer, at least 0) and a number within ``allowed``."""

    def parse(text: str) -> tuple[int, float]:
        token, sep, value = text.partition("=")
        try:
            parsed = int(token), float(value)
        except ValueError:
            parsed = None
        if not sep or parsed is None or parsed[0] < 0:
            raise argparse.ArgumentTypeError(f"expected TOKEN_ID=VALUE (e.g. 15043=-100), got {text!r}")
        if parsed[1] not in allowed:
            raise argparse.ArgumentTypeError(f"the value must be {allowed.text}, got {value}")
        return parsed

    parse.__name__ = "ID=VALUE"
    parse.allowed = allowed
    return parse


def template_option(choices: Sequence[str] = TRAIN_TEMPLATE_NAMES, own: bool = False,
                    read: bool = False) -> Callable[[str], str]:
    """An argparse type: a chat format's name in any spelling of :mod:`qlora.template_names`, as qlora's name;
    with ``own``, also the user's own template (a path or Jinja text, :mod:`qlora.template_file`), with ``read``
    read here so that a missing or non-template file is refused before anything loads (train checks it with the
    rest of its config, which may name it too)."""

    def parse(text: str) -> str:
        if own and is_custom(text):
            if read:
                try:
                    read_template(text)
                except UsageError as exc:  # argparse names the option itself
                    raise argparse.ArgumentTypeError(str(exc).removeprefix("--template ")) from None
            return text
        try:
            return template_name(text, choices)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = "template"
    return parse


def add_template_option(parser: argparse.ArgumentParser, choices: Sequence[str], help: str) -> None:
    """``--template`` of the commands that prompt or evaluate a model: one of ``choices`` or the user's own
    template, as ``qlora train --template`` takes it, so a base model can be used under the user's template and
    an adapter's saved one overridden."""
    parser.add_argument("--template", default="auto", type=template_option(choices, own=True, read=True),
                        metavar="TEMPLATE", help=f"{help}. One of {', '.join(choices)}, or your own chat template: "
                                                 "a Jinja file (.jinja), a tokenizer folder, or inline Jinja text")


def template_kwargs_option(text: str) -> dict:
    """An argparse type: a JSON object of chat template variables (``{"enable_thinking": false}``), refused when it
    is not one or holds a parameter of the rendering (:mod:`qlora.template_kwargs`) rather than a variable."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; give a JSON "
                                         """object such as '{"enable_thinking": false}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of template variables (such as "
                                         f"""'{{"enable_thinking": false}}'), got {text!r}""")
    key = render_parameter(value)
    if key == "chat_template":
        raise argparse.ArgumentTypeError("key 'chat_template': give the template with --template instead")
    if key is not None:
        raise argparse.ArgumentTypeError(f"key {key!r} is a parameter of the rendering, not a template variable; "
                                         "leave it out")
    return value



def add_template_kwargs_option(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A ``--chat-template-kwargs``-style option (vLLM's names): a JSON object of variables the chat template is
    rendered with, such as Qwen3's ``enable_thinking`` or gpt-oss's ``reasoning_effort``."""
    parser.add_argument(name, type=template_kwargs_option, metavar="JSON",
                        help=f"{help}, as a JSON object, e.g. '{{\"enable_thinking\": false}}' (Qwen3, Gemma 4) or "
                             "'{\"reasoning_effort\": \"high\"}' (gpt-oss); keys such as tokenize or "
                             "chat_template, which are not template variables, are refused")


# Options whose empty value means something of its own: no system prompt at all (a template's default one left out),
# no turn-end tokens (instead of the ones the adapter's run recorded), a prompt that is its --image alone (generate
# refuses an empty one without), no target modules (with --target-parameters: the experts alone).
_BLANK_MEANS_NONE = frozenset({"system", "eot_tokens", "prompt", "target_modules"})


def check_blank_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option given as an empty or blank string (``--model "$MODEL"`` with the variable unset) where that
    is not the option's own default: a blank path would be read as the working folder, and a blank optional value as
    the option left out (a session not saved, an adapter not loaded) without a word.

    Raises:
        UsageError: naming the first such option.
    """
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        given = value if isinstance(action, argparse._AppendAction) and isinstance(value, list) else [value]
        if (action.nargs == 0 or action.choices or action.dest in _BLANK_MEANS_NONE or action.default == ""
                or not any(isinstance(v, str) and not v.strip() for v in given)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
        way_out = "" if action.required or not action.option_strings else ", or leave the option out"
        raise UsageError(f"{name} is empty (an unset shell variable?); give it a value{way_out}. "
                         f"{parser.prog} --help describes it.")


positive_int = number(int, AT_LEAST_1)
non_negative_int = number(int, NON_NEGATIVE)
positive_float = number(float, POSITIVE)
non_negative_float = number(float, NON_NEGATIVE)


class HelpFormatter(argparse.HelpFormatter):
    """Adds the allowed values or range and the default to every option's help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        extra = []
        if action.choices and "one of" not in text:
            extra.append("one of " + ", ".join(map(str, action.choices)))
        allowed = getattr(action.type, "allowed", None)
        if allowed is not None and allowed.text not in text and allowed.text != "finite":
            extra.append(allowed.text)
        default = action.default
        if "default" in text or default in (None, "") or default == argparse.SUPPRESS or action.required:
            pass
        elif isinstance(action, argparse.BooleanOptionalAction):
            extra.append(f"default: {'on' if default else 'off'}")
        elif default is not False and default != [] and action.option_strings:
            extra.append(f"default: {default}")
        if extra:
            text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
        return text if "%(" in text else text.replace("%", "%%")
