"""Text that reaches qlora as bytes which are not UTF-8: an argument or a line of standard input in a Latin-1
terminal, a file name from another system.

Python hands such bytes over as lone surrogates (``surrogateescape``), which pass through until a tokenizer or a
UTF-8 file (the run's config, an adapter's JSON) receives them and fails with a traceback, after part of an output
was written. They are refused where they come in, naming the option and the byte.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError


def not_utf8(text: str) -> str | None:
    """Why ``text`` is not UTF-8 text (its first undecodable byte and where), or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = text[exc.start].encode("utf-8", "surrogateescape")
        shown = f"byte 0x{byte[0]:02x}" if len(byte) == 1 else f"character U+{ord(text[exc.start]):04X}"
        return f"not UTF-8 text ({shown} at character {exc.start + 1})"
    return None


def undecoded(exc: UnicodeDecodeError) -> str:
    """:func:`not_utf8`'s words for a stream that decodes strictly and met a byte that is not UTF-8."""
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"


def stdin_text(option: str) -> str:
    """All of standard input, for ``option`` given as ``-``.

    Raises:
        UsageError: standard input is not UTF-8 text.
    """
    try:
        text = sys.stdin.read()
    except UnicodeDecodeError as exc:
        problem = undecoded(exc)
    else:
        problem = not_utf8(text)
        if problem is None:
            return text
    raise UsageError(f"{option} - : standard input is {problem}; give the text in UTF-8 (iconv -f latin1 -t utf-8 "
                     "converts a Latin-1 file).")


def check_utf8_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an option (or positional argument) of ``parser`` whose value is not UTF-8.

    Raises:
        UsageError: naming the option, the value with its bytes as given, and what to do.
    """
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        for item in value if isinstance(value, list) else [value]:
            problem = not_utf8(item) if isinstance(item, str) else None
            if problem:
                name = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
                shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise UsageError(f"{name} '{shown}': {problem}. qlora keeps paths and text in UTF-8 (its JSON and "
                                 "YAML files, the tokenizer), so give it in UTF-8: set the terminal to UTF-8, or "
                                 "rename the file or folder.")
