"""``qlora train [CONFIG.yaml] [--flag value ...]``: QLoRA fine-tuning.

The flags are generated from :class:`qlora.train.config.TrainConfig`, so every
YAML key has a flag of the same name and the same help text; flags given on the
command line win over the file. ``--nproc N`` re-runs the same command under
torchrun's launcher (:mod:`qlora.cli.launch`; one process per GPU, gloo on the CPU).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

NAME = "train"
HELP = "QLoRA-fine-tune a model on a dataset (YAML config and/or flags)"
# a job scheduler's stop (SLURM, Kubernetes) is a SIGTERM: it stops a run as Ctrl-C does, its load and final save
# included (between steps the trainer's own handler saves a checkpoint first)
STOPPED_BY_SIGTERM = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...train.config import TrainConfig, field_type
    from ..options import positive_int, template_option

    parser.add_argument("config_file", nargs="?", metavar="CONFIG.yaml", help="options as a YAML mapping")
    parser.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                        help="processes on this machine, launched by torchrun (data parallel; add --fsdp to shard)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + _allowed_and_default(f)
        if field_type(f) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            # --optim and --lr-scheduler have no fixed choices: TrainConfig takes other tools' names for them too.
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                choices=f.metadata["choices"], help=help_text,
                                type=template_option(own=True) if f.name == "template" else None)


def _allowed_and_default(f) -> str:
    """`` (in [0, 1); default: 0.03)``: the field's range or choices and its default, the way the other commands'
    help lines show them (no ``default: None`` or empty default, on/off switches as on/off)."""
    extra = []
    if f.metadata["range"] and f.metadata["range"].text != "finite":
        extra.append(f.metadata["range"].text)
    if f.metadata["choices"]:
        extra.append("one of " + ", ".join(f.metadata["choices"]))
    if isinstance(f.default, bool):
        extra.append(f"default: {'on' if f.default else 'off'}")
    elif f.default not in (None, ""):
        extra.append(f"default: {f.default}")
    return f" ({'; '.join(extra)})" if extra else ""


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The ``qlora train`` arguments that run this same training in each of ``args.nproc`` processes."""
    argv = ["train"]
    if args.config_file:
        argv.append(args.config_file)
    for key, value in vars(args).items():
        if key in ("command", "config_file", "nproc"):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    from ...errors import UsageError
    from ...train.config import at_line, load_config

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config_file", "nproc")}
    origin: dict[str, str] = {}
    config = load_config(args.config_file, overrides, check_paths=True, origin=origin)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1; got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ...train.distributed import fsdp2_api
        from ..launch import launch

        if config.fsdp:  # before any rank starts: one message, not one per rank
            fsdp2_api()

        return launch(args.nproc, rank_argv(args), "train")
    from ...train.distributed import RankLost
    from ...train.trainer import Interrupted, Trainer  # torch: not imported for the options' errors
    from ..launch import end_rank, report_error

    try:
        trainer = Trainer(config)
    except UsageError as exc:  # a check of the model or the data: named by the YAML line that set its option
        raise at_line(exc, origin) from None
    try:
        losses = trainer.run()
    except UsageError as exc:
        raise at_line(exc, origin) from None
    except Interrupted as exc:
        if trainer.dist.is_main:  # every rank stopped at the same step; under --nproc the launcher says it
            report_error(f"qlora train: {exc}")
        status = 130
    except RankLost as exc:  # the environment, not the input (a rank killed): status 1
        report_error(f"qlora train: error: {exc}", lost=True)
        status = 1
    else:
        if losses and trainer.dist.is_main:
            steps = f"{trainer.step} step{'' if trainer.step == 1 else 's'}"
            print(f"trained {steps}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; adapter in {config.output}")
        status = 0
    if trainer.dist.enabled:
        end_rank(status)  # here, while the trainer (its DDP/FSDP model) is alive: see end_rank
    return status
