"""Every command's ``--help`` says an option's default one way: ``default: VALUE`` (on/off for switches),
never ``(default nf4)`` or ``sigmoid (default)``."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

import pytest

from qlora.cli.main import COMMANDS, build_parser
from qlora.train.config import TrainConfig

# "default" not written as "default:" ("defaults to" and "by default" are prose, not a default's value)
OTHER_FORM = re.compile(r"(?<!by )\bdefault\b(?![:s])")


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _default(command: str, action: argparse.Action):
    if action.default is argparse.SUPPRESS and command == "train":  # train's flags carry TrainConfig's defaults
        return {f.name: f.default for f in fields(TrainConfig)}.get(action.dest)
    return action.default


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_is_shown_as_default_colon_value(command):
    parser = _subparser(command)
    formatter = parser._get_formatter()
    checked = 0
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = " ".join(formatter._expand_help(action).split())
        assert not OTHER_FORM.search(text), (command, action.option_strings, text)
        default = _default(command, action)
        if default in (None, False, "", [], argparse.SUPPRESS) or action.required:
            continue
        shown = ("on" if default else "off") if isinstance(default, bool) else str(default)
        assert text.count(f"default: {shown}") == 1, (command, action.option_strings, text)
        checked += 1
    assert checked, command
