"""Which base a command loads for its adapters: ``--model`` may be an adapter folder (as in
PEFT and transformers), and an unset ``--quant`` means the format the adapter was trained on
(see :mod:`qlora.model.adapter_base`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError

_DEFAULT = {"blocksize": 64, "double_quant": True}


def resolve_base(args: argparse.Namespace, command: str) -> None:
    """Rewrite ``args`` in place: no ``--model`` -> the base the first ``--adapter``'s config names;
    ``--model ADAPTER`` -> its base + ``--adapter ADAPTER``; then ``args.quant``, ``args.blocksize`` and
    ``args.double_quant`` as the first adapter was trained."""
    if command in ("train", "estimate") or not hasattr(args, "adapter"):
        return  # train's options merge with its YAML file first (TrainConfig); estimate's MODEL may be a name
    from ..model.adapter_base import adapter_folder_base  # torch: not imported for --help

    if getattr(args, "model", None) is None:
        _model_from_adapter(args, command)
    base = adapter_folder_base(args.model)
    if base is not None:
        _adapter_as_model(args, base, command)
    if hasattr(args, "quant"):
        _quant_as_trained(args, command)


def adapter_names(args: argparse.Namespace) -> dict[str, str]:
    """Adapter name -> folder, from the repeated ``--adapter [NAME=]DIR``; a name taken from the folder
    has its dots made ``_`` (``qwen2.5-sql`` -> ``qwen2_5-sql``: torch's module names hold no dots)."""
    from ..model.local_path import check_adapter_path
    from ..nn.adapter_name import adapter_name_problem

    names: dict[str, str] = {}
    for item in args.adapter:
        check_adapter_path(item, defer_hub_ids=True)  # as qlora.cli.main does: args may come from elsewhere
        name, _, path = item.rpartition("=")
        if name and adapter_name_problem(name):
            raise UsageError(f"--adapter {item}: {name!r} cannot name an adapter: {adapter_name_problem(name)}; "
                             "choose another NAME (letters, digits, '-' and '_').")
        name = name or Path(path).resolve().name.replace(".", "_")
        if adapter_name_problem(name):
            raise UsageError(f"--adapter {item}: the folder's name {name!r} cannot name an adapter: "
                             f"{adapter_name_problem(name)}; name it with --adapter NAME=DIR.")
        if name in names:
            raise UsageError(f"two adapters are named {name!r}; name them with --adapter NAME=DIR")
        names[name] = path
    return names


def adapter_dirs(args: argparse.Namespace) -> list[str]:
    """The adapter folders of ``--adapter`` (repeated ``[NAME=]DIR`` items, or one folder)."""
    if isinstance(args.adapter, list):
        return list(adapter_names(args).values())
    return [args.adapter] if args.adapter else []


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """``--quant`` and ``--compute-dtype``: how generate, chat and serve load the base they answer with."""
    parser.add_argument("--quant", choices=("nf4", "fp4", "none"), default=None,
                        help="4-bit format of the base weights on load, or none for 16/32-bit "
                             "(default: the format the adapter was trained on, else nf4)")
    parser.add_argument("--compute-dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="dtype of the matmuls and unquantized weights")


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``quant``/``blocksize``/``double_quant`` for :func:`qlora.model.load.load_model` (resolved here
    when ``args`` did not come through :func:`qlora.cli.main.main`); the adapters are checked once more, a name
    shaped like a hub id too, now that the command's other options were."""
    from ..model.local_path import check_adapter_path

    if not hasattr(args, "blocksize"):
        resolve_base(args, getattr(args, "command", None) or "generate")
    adapters = getattr(args, "adapter", None)
    for item in [adapters] if isinstance(adapters, str) else adapters or []:
        check_adapter_path(item)
    return {"quant": None if args.quant == "none" else args.quant, "blocksize": args.blocksize,
            "double_quant": args.double_quant}


def _model_from_adapter(args: argparse.Namespace, command: str) -> None:
    """``--adapter DIR`` without ``--model``: the base its adapter_config.json names (``base_model_name_or_path``),
    as ``qlora train`` and PEFT's ``AutoPeftModelForCausalLM`` take it."""
    from ..model.adapter_base import adapter_folder_base
    from ..model.local_path import check_adapter_path

    dirs = adapter_dirs(args)
    if not dirs:
        raise UsageError(f"qlora {command} needs --model (a model folder or hub id), or --adapter DIR alone: the "
                         "base its adapter_config.json names (--model is required without --adapter).")
    check_adapter_path(dirs[0])  # a hub id: refused here, saying how to download it
    base = adapter_folder_base(dirs[0])
    if base is None:
        raise UsageError(f"--model is required: --adapter {dirs[0]} is not an adapter folder (adapter_config.json "
                         "without a config.json) whose adapter_config.json names its base model; give the base with "
                         "--model.")
    args.model = base
    print(f"qlora {command}: no --model: loading the base {dirs[0]}'s adapter_config.json names, {base}",
          file=sys.stderr)


def _adapter_as_model(args: argparse.Namespace, base: str, command: str) -> None:
    folder = args.model
    if isinstance(args.adapter, list):
        args.adapter = [folder] + args.adapter
    elif args.adapter:
        raise UsageError(f"--model {folder} is a LoRA adapter and --adapter {args.adapter} another; qlora {command} "
                         "takes one: pass the base model with --model.")
    else:
        args.adapter = folder
    args.model = base
    print(f"qlora {command}: {folder} is a LoRA adapter: loading its base {base} with it", file=sys.stderr)


def _quant_as_trained(args: argparse.Namespace, command: str) -> None:
    from ..model.adapter_base import trained_base

    dirs = adapter_dirs(args)
    bases = [(d, trained_base(d)) for d in dirs]
    recorded = [(d, b) for d, b in bases if b is not None]
    trained = recorded[0][1] if recorded else None
    if len({_describe(b) for _, b in recorded}) > 1:
        listing = "; ".join(f"{d}: {_describe(b)}" for d, b in recorded)
        print(f"qlora {command}: warning: the adapters were trained on differently quantized bases ({listing}); "
              f"loading the first one's", file=sys.stderr)
    if args.quant is None and not dirs and command == "eval" and _merged_run(args.model):
        args.quant = "none"
        print(f"qlora eval: {args.model} is a merged fine-tune (it carries its run's trained_tokens.json): "
              "evaluating its 16-bit weights, which compute what the run's base + adapter did; --quant nf4 loads "
              "it in 4 bits (a quarter of the memory, a loss close to the run's, not equal)", file=sys.stderr)
    if args.quant is None:
        args.quant = trained["quant"] if trained else ("nf4" if dirs or command != "export" else "none")
    elif trained is not None and args.quant != trained["quant"]:
        print(f"qlora {command}: warning: {recorded[0][0]} was trained on a {_describe(trained)} base; loading "
              f"{args.quant} as --quant asks changes the weights the adapter corrects", file=sys.stderr)
    same = trained is not None and trained["quant"] == args.quant
    for key, default in _DEFAULT.items():
        setattr(args, key, trained.get(key, default) if same else default)


def _merged_run(model: str) -> bool:
    """Whether ``model`` is a folder qlora merged an adapter into (``qlora merge``, ``qlora.save_merged``): its
    16-bit weights are the run's 4-bit base with the adapter folded in, so loading them as they are computes what
    the run computed, while quantizing them again adds a second rounding. Not a folder ``qlora quantize`` wrote
    (its config names its 4-bit format, which loading follows)."""
    import json

    from ..model.trained_tokens import MODEL_FILE

    config = Path(model, "config.json")
    try:
        stored = "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # loading names a missing or damaged config.json
        return False
    return Path(model, MODEL_FILE).is_file() and not stored


def _describe(base: dict[str, Any]) -> str:
    if base["quant"] == "none":
        return "16-bit"
    dq = "double-quantized" if base.get("double_quant", True) else "no double quantization"
    return f"{base['quant']} (block {base.get('blocksize', 64)}, {dq})"
