"""Entry point of the ``qlora`` command.

Each sub-command lives in its own module under ``qlora.cli.commands`` and
exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``qlora --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import UsageError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("qlora.cli.commands.estimate", "memory needed to fine-tune a model: full, 16-bit LoRA and QLoRA"),
    "quant-error": ("qlora.cli.commands.quant_error", "quantization error of NF4/FP4/INT4 and bits per parameter"),
    "generate": ("qlora.cli.commands.generate", "stream a model's continuation of a prompt, with sampling options"),
    "chat": ("qlora.cli.commands.chat", "multi-turn chat with a model, with conversation memory persisted in SQLite"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its usage line, no traceback
        self.print_usage(sys.stderr)
        self.exit(2, f"qlora: error: {message}\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="qlora", description="Fine-tune large language models on one GPU with QLoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in COMMANDS:
        print(f"qlora: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"qlora {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
