"""``qlora train [CONFIG.yaml] [--flag value ...]``: QLoRA fine-tuning.

The flags are generated from :class:`qlora.train.config.TrainConfig`, so every
YAML key has a flag of the same name and the same help text; flags given on the
command line win over the file.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

NAME = "train"
HELP = "QLoRA-fine-tune a model on a dataset (YAML config and/or flags)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...train.config import TrainConfig, field_type

    parser.add_argument("config_file", nargs="?", metavar="CONFIG.yaml", help="options as a YAML mapping")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if field_type(f) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                choices=f.metadata["choices"], help=help_text)


def run(args: argparse.Namespace) -> int:
    from ...train.config import load_config
    from ...train.trainer import Interrupted, Trainer

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config_file")}
    config = load_config(args.config_file, overrides)
    trainer = Trainer(config)
    try:
        losses = trainer.run()
    except Interrupted as exc:
        print(f"qlora train: {exc}")
        return 130
    if losses:
        print(f"trained {trainer.step} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter in {config.output}")
    return 0
