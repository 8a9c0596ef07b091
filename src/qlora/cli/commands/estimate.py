"""``qlora estimate``: will this model and these options fit on my GPU?

Prints the memory table of :mod:`qlora.model.estimate` for full fine-tuning,
16-bit LoRA and QLoRA side by side, and which of them fit ``--gpu-memory``.
The options and their defaults are those of ``qlora train`` (taken from
:class:`qlora.train.config.TrainConfig`, so they cannot drift apart): what
``qlora estimate MODEL`` prints is what ``qlora train --model MODEL`` needs.
An adapter folder as MODEL (or MODEL with ``--adapter FOLDER``, as train spells it) is what continuing it takes:
its base, rank and targets, the tensors it saved, and the 4-bit format it was trained on.
"""

from __future__ import annotations

import argparse

from ...errors import UsageError

NAME = "estimate"
HELP = "memory needed to fine-tune a model: full, 16-bit LoRA and QLoRA side by side"

# TrainConfig fields that change memory, shown with train's flag names and defaults.
_TRAIN_OPTIONS = ("quant", "double_quant", "blocksize", "quantize_experts", "rank", "target_modules",
                  "target_parameters", "seq_len", "batch_size", "gradient_checkpointing", "optim", "chunked_ce",
                  "method", "precompute_ref")
# train's help for these speaks of train's other options; what they mean for the estimate instead
_ESTIMATE_HELP = {"precompute_ref": "dpo, kto: count the reference log-probs as computed once before training, "
                                    "without a reference forward pass in each step",
                  "method": "training objective, as qlora train's --method: sft, or on preference pairs dpo (against "
                            "a reference model), orpo, cpo or simpo, or kto on unpaired rows",
                  "target_parameters": "comma-separated 3-D MoE expert weights to adapt, one LoRA per expert (PEFT's "
                                       "target_parameters), e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj; "
                                       "gate.weight: the MoE routers' weights"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from ...option_range import POSITIVE
    from ...quant import BLOCKSIZES
    from ...train.config import TrainConfig, field_type
    from ..options import number

    where = ("model directory or config.json, or a hub id; the released models --list-models names are estimated "
             "without the hub (-Instruct, -it, -chat and -Base variants too)")
    parser.add_argument("model_arg", nargs="?", metavar="MODEL", help=where)
    parser.add_argument("--model", help="the same as MODEL (as qlora train spells it)")
    parser.add_argument("--list-models", action="store_true",
                        help="print the released models estimated by their hub ids without the hub, and exit")
    by_name = {f.name: f for f in fields(TrainConfig)}
    for name in _TRAIN_OPTIONS:
        f = by_name[name]
        flag = "--" + name.replace("_", "-")
        help_text = _ESTIMATE_HELP.get(name, f.metadata["help"])
        if field_type(f) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif name == "blocksize":
            parser.add_argument(flag, type=int, choices=BLOCKSIZES, default=f.default, help="weights per absmax block")
        elif name == "optim":  # checked by TrainingOptions, which takes train's aliases (adamw_torch, ...) too
            parser.add_argument(flag, default=f.default, help=help_text)
        elif field_type(f) is int:
            parser.add_argument(flag, type=number(int, f.metadata["range"]), default=f.default, help=help_text)
        else:
            parser.add_argument(flag, choices=f.metadata["choices"], default=f.default, help=help_text)
    parser.add_argument("--adapter", help="estimate continuing this adapter folder (PEFT format) on MODEL, as qlora "
                                          "train --adapter trains it: its own rank, targets and saved tensors")
    parser.add_argument("--gpu-memory", type=number(float, POSITIVE), default=None,
                        help="GPU memory in GiB to check the totals against")


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        from ...model.known_shapes import known_model_names

        print("Released models estimated without the hub (any name on a line; case, the organisation and -Instruct,"
              " -it, -chat, -hf or -Base may differ):")
        print("\n".join(known_model_names()))
        return 0
    if args.model_arg and args.model and args.model_arg != args.model:
        raise UsageError(f"two models given: {args.model_arg} and --model {args.model}; give one")
    model = args.model_arg or args.model
    if not model:
        raise UsageError("give the model: qlora estimate MODEL (a folder, a config.json, a hub id or a known shape)")
    # torch: not imported for the errors above
    from dataclasses import replace
    from pathlib import Path

    from ...model.adapter_size import adapter_size
    from ...model.estimate import TrainingOptions, estimate, format_table, load_config
    from ...model.load import bnb_4bit_config, check_quantization_readable

    adapter = args.adapter or model
    model, targets = _adapter_as_model(args, model)
    parameters = tuple(t.strip() for t in args.target_parameters.split(",") if t.strip())
    if targets is not None:
        pass  # the adapter's own
    elif args.target_modules.strip().lower() == "none" or (not args.target_modules.strip() and parameters):
        targets = ()
    elif args.target_modules.strip() != "all-linear":
        targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
        if not targets:
            raise UsageError("--target-modules is empty; give comma-separated linear layer names such as q_proj,v_proj.")
    opts = TrainingOptions(
        quant=args.quant, double_quant=args.double_quant, blocksize=args.blocksize,
        quantize_experts=args.quantize_experts, rank=args.rank,
        target_modules=targets, target_parameters=parameters, seq_len=args.seq_len, batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, chunked_ce=args.chunked_ce,
        method=args.method, precompute_ref=args.precompute_ref,
        adapter=adapter_size(adapter) if adapter != model else None,
    )
    config = load_config(model, "--model" if args.model else "MODEL")
    check_quantization_readable(config, Path(model).parent if Path(model).is_file() else Path(model))
    stored = bnb_4bit_config(config)
    if stored is not None:  # loading reads its packed codes as they are, whatever --quant and --double-quant say
        opts = replace(opts, quant=stored.get("bnb_4bit_quant_type", "fp4"), blocksize=64,  # BitsAndBytesConfig's
                       double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)))  # defaults; blocks of 64
        print(f"{model} is a bitsandbytes 4-bit checkpoint: estimated in its stored format"
              + (f", {', '.join(stored['llm_int8_skip_modules'])} kept 16-bit"
                 if stored.get("llm_int8_skip_modules") else ""))
    unit = {"sft": "", "kto": " examples (KTO)"}.get(opts.method, f" pairs ({opts.method.upper()})")
    print(f"{model}: seq {opts.seq_len} x batch {opts.batch_size}{unit}, {opts.quant}"
          f"{' + double quant' if opts.double_quant and opts.quant != 'none' else ''}, block {opts.blocksize}, "
          f"LoRA r={opts.rank}, checkpointing {'on' if opts.gradient_checkpointing else 'off'}, {opts.optim}"
          f"{', chunked loss' if opts.chunked_ce else ''}\n")
    print(format_table(estimate(config, opts), args.gpu_memory))
    return 0


def _adapter_as_model(args: argparse.Namespace, model: str) -> tuple[str, tuple[str, ...] | str | None]:
    """``(model, None)``, or for an adapter folder ``(its base, its target modules)`` with ``args`` set to
    continue that adapter (as ``qlora train --model ADAPTER`` does): its rank, expert targets and
    recorded 4-bit format. Target modules are names, or PEFT's regex of whole module paths."""
    from ...model.adapter_base import adapter_folder_base, trained_base
    from ...model.adapter_io import read_adapter_config

    if args.adapter:  # an adapter folder (the CLI checks --adapter paths before commands run)
        from pathlib import Path

        if (Path(model).expanduser() / "adapter_config.json").is_file():
            raise UsageError(f"{model} is an adapter folder too; give its base as MODEL with --adapter, or the adapter "
                             "alone as MODEL (estimated on the base it names).")
        base, folder = model, args.adapter
    else:
        base, folder = adapter_folder_base(model), model
        if base is None:
            return model, None
    model = folder
    config = read_adapter_config(model)
    rank, modules, parameters = config.get("r"), config.get("target_modules"), config.get("target_parameters") or []
    if not isinstance(rank, int) or rank < 1:
        raise UsageError(f"{model}/adapter_config.json: r must be a positive integer, got {rank!r}")
    if not isinstance(parameters, list) or not isinstance(modules, (str, list, type(None))):
        raise UsageError(f"{model}/adapter_config.json: target_modules and target_parameters must be lists of names")
    args.rank, args.target_parameters = rank, ",".join(parameters)
    for key, value in (trained_base(model) or {}).items():
        setattr(args, key, value)
    print(f"{model} is a LoRA adapter: estimating training it further on its base {base} "
          f"(r={rank}, {args.quant}, as it was trained)")
    targets = None if modules == "all-linear" else modules if isinstance(modules, str) else tuple(sorted(set(
        modules or [])))
    return base, targets
