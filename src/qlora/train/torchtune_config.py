"""torchtune's LoRA/QLoRA recipe configs (``tune run lora_finetune_single_device --config ...``) as qlora's options.

A file is torchtune's when its ``model`` is a ``{_component_: torchtune.models...}`` mapping. Its components
are read as torchtune's builders and recipes read them, with their defaults where the file is silent:

- ``model``: a ``lora_*`` builder is LoRA on a 16-bit base, ``qlora_*`` on an NF4 one; ``lora_rank`` (8),
  ``lora_alpha`` (16), ``lora_dropout`` (0), ``use_dora``; ``lora_attn_modules`` (q_proj, k_proj, v_proj,
  output_proj), ``apply_lora_to_mlp`` (w1, w2, w3) and ``apply_lora_to_output`` named as the checkpoint's
  transformers modules (o_proj, gate_proj, down_proj, up_proj, lm_head);
- ``checkpointer``: a ``FullModelHFCheckpointer``'s ``checkpoint_dir`` is the model, its tokenizer qlora's;
- ``dataset``: :mod:`qlora.train.data.torchtune_datasets`, written as the config's tokenizer writes it
  (:mod:`qlora.train.data.torchtune_tokenizers`, its prompt template included), or in the model's chat template
  with ``--template``; ``tokenizer.max_seq_len`` (none: the model's context) truncates as torchtune does;
- ``optimizer`` (torch's AdamW: lr 1e-3, weight_decay 0.01; bitsandbytes' paged AdamW), ``lr_scheduler``
  (``get_cosine_schedule_with_warmup``: transformers' cosine; none: a constant rate), ``clip_grad_norm`` (none:
  no clipping), ``loss`` (cross-entropy, chunked or not), ``batch_size``, ``gradient_accumulation_steps``,
  ``epochs``, ``max_steps_per_epoch`` (qlora's own), ``enable_activation_checkpointing``, ``dtype``, ``seed``, ``output_dir``;
- logging, profiling, compile, device and checkpoint-format keys are passed over, and said;
- lora_dpo's configs: ``loss`` ``DPOLoss`` (``beta``, ``label_smoothing``) or ``RSOLoss`` (``gamma``: the hinge
  loss) is ``--method dpo``, its reference the base with the adapter off, as lora_dpo's; the preference datasets
  of :mod:`qlora.train.data.torchtune_datasets`;
- what trains otherwise (full fine-tuning, full-weight DPO, QAT, knowledge distillation, vision models, packing in
  dataset order, other tokenizers and prompt templates) is refused by file and line.

``${key}`` interpolations (OmegaConf's) are resolved against the file's own keys first.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.declared import DEFAULT_SEED
from qlora.train.data.torchtune_datasets import BUILDERS, HUB_SOURCES, PREFERENCE_BUILDERS
from qlora.train.data.torchtune_tokenizers import DEFAULT_TEMPLATES, FAMILIES, TEMPLATES

_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
_MLP = ("gate_proj", "down_proj", "up_proj")  # torchtune's w1, w2, w3
_OPTIMIZERS = {"torch.optim.AdamW": "adamw", "bitsandbytes.optim.PagedAdamW": "paged_adamw_32bit",
               "bitsandbytes.optim.PagedAdamW32bit": "paged_adamw_32bit",
               "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit", "bitsandbytes.optim.AdamW8bit": "adamw_8bit"}
_COSINE = "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup"
_LOSSES = ("torchtune.modules.loss.CEWithChunkedOutputLoss", "torchtune.modules.loss.LinearCrossEntropyLoss",
           "torch.nn.CrossEntropyLoss")
# lora_dpo's losses (torchtune.rlhf.loss): qlora's DPO loss type and the argument that is its beta
_PREFERENCE_LOSSES = {"torchtune.rlhf.loss.DPOLoss": ("sigmoid", "beta"), "torchtune.rlhf.loss.RSOLoss": ("hinge",
                                                                                                        "gamma")}
_DTYPES = {"bf16": "bf16", "fp32": "fp32"}
_STACK_EXCHANGE_DIR = "data/rl"
# Keys of the recipes' runtime: logging, profiling, kernels, devices, checkpoint files.
RUNTIME = frozenset({"metric_logger", "log_every_n_steps", "log_peak_memory_stats", "log_level", "profiler",
                     "device", "compile", "enable_activation_offloading", "low_cpu_ram", "save_adapter_weights_only",
                     "enable_async_checkpointing", "cudnn_deterministic_mode", "custom_sharded_layers",
                     "fsdp_cpu_offload", "fsdp_reshard_after_forward", "tensor_parallel_dim",
                     "tensor_parallel_plan", "data_parallel_shard_dim", "data_parallel_replicate_dim",
                     "collate_fn", "save_every_n_steps", "batch_size_val", "run_val_every_n_steps", "dataset_val",
                     "optimizer_in_bwd", "ac_mode", "ac_option"})
_HANDLED = {"model", "checkpointer", "tokenizer", "dataset", "optimizer", "lr_scheduler", "loss", "batch_size",
            "epochs", "max_steps_per_epoch", "gradient_accumulation_steps", "clip_grad_norm", "seed", "shuffle",
            "dtype", "output_dir", "enable_activation_checkpointing", "resume_from_checkpoint"}
_REFUSED = {"teacher_model": "knowledge distillation (a teacher's logits in the loss)",
            "teacher_checkpointer": "knowledge distillation (a teacher's logits in the loss)",
            "kd_loss": "knowledge distillation (a teacher's logits in the loss)", "kd_ratio": "knowledge distillation",
            "quantizer": "quantization-aware training (fake-quantized weights)",
            "ref_checkpointer": "full-weight DPO against a separate reference checkpoint (qlora's DPO trains LoRA, its "
                                "reference the base with the adapter off, as lora_dpo's)",
            "reward_model": "PPO"}


def is_torchtune(loaded: dict) -> bool:
    """Whether a config file is torchtune's: its ``model`` names a torchtune builder."""
    model = loaded.get("model")
    return isinstance(model, dict) and str(model.get("_component_", "")).startswith("torchtune.models.")


def torchtune_options(loaded: dict, lines: dict[str, int], path: Path, overridden: frozenset[str]) -> dict:
    """qlora's options for a torchtune recipe config (``overridden``: the options the command line sets).

    Raises:
        UsageError: what qlora would train otherwise, naming the file, line and what to do.
    """
    where = {k: f"{path} line {lines.get(k, '?')}" for k in loaded}
    cfg = {k: _resolve(v, loaded, where[k]) for k, v in loaded.items()}
    for key, why in _REFUSED.items():
        if key in cfg:
            raise UsageError(f"{where[key]}: {key}: this torchtune recipe trains with {why}; qlora trains LoRA on "
                             "the next-token loss or DPO's. Use a lora_finetune or lora_dpo config, or torchtune for "
                             "this recipe.")
    unknown = sorted(set(cfg) - _HANDLED - RUNTIME)
    if unknown:
        raise UsageError(f"{where[unknown[0]]}: {', '.join(unknown)}: not a key of torchtune's LoRA fine-tuning "
                         "recipes that qlora reads; remove it, or train this recipe with torchtune.")
    out: dict[str, Any] = {}
    read_from: dict[str, str] = {}  # qlora's option -> the file's key it is read from (whose line names it)

    def read(key: str, options: dict[str, Any]) -> None:
        out.update(options)
        read_from.update(dict.fromkeys(options, key))

    read("model", _model(cfg["model"], where["model"]))
    read("checkpointer", {"model": _checkpoint_dir(cfg.get("checkpointer"), where.get("checkpointer", str(path)))})
    template = "template" in overridden
    render, prompt_template, limit = _render(cfg.get("tokenizer"), where.get("tokenizer", str(path)), template)
    read("dataset", _dataset(cfg.get("dataset"), where.get("dataset", str(path)), render,
                             {"prompt_template": prompt_template, "max_seq_len": limit}))
    read("tokenizer", {"seq_len": _seq_len(limit, out["model"], render, out["data"])})
    read("optimizer", _optimizer(cfg.get("optimizer"), where.get("optimizer", str(path))))
    read("lr_scheduler", _schedule(cfg.get("lr_scheduler"), where.get("lr_scheduler", str(path))))
    preference = json.loads(out["data"])[0]["torchtune"]["builder"] in PREFERENCE_BUILDERS
    read("loss", _loss(cfg.get("loss"), where.get("loss", str(path)), preference))
    training = _training(cfg, where)
    out |= training
    read_from |= {option: _TRAINING_KEYS.get(option, option) for option in training}
    passed = sorted(set(cfg) & RUNTIME)
    seed = "" if cfg.get("seed") is not None or "seed" in overridden else (
        "; seed: null draws a random seed in torchtune, qlora takes its default --seed "
        f"{DEFAULT_SEED} (give seed: N to choose)")
    recipe = "lora_dpo" if preference else "lora_finetune"
    print(f"qlora train: {path} is a torchtune recipe config: read as {recipe} reads it, torchtune's defaults "
          "where it is silent; its last partial batch of an epoch is trained (torchtune drops it)"
          f"{seed}; passing over {', '.join(passed) or 'nothing'} (its runtime: logging, kernels, devices)",
          file=sys.stderr)
    model_line = lines.get("model", 0)
    for key in out:  # a value qlora checks later is named by the line it was read from (the model's: a default)
        lines[key] = lines.get(read_from[key], model_line)
    return out


def _resolve(value: Any, root: dict, where: str) -> Any:
    """OmegaConf's ``${a.b}`` interpolations, against the file's keys."""
    if isinstance(value, dict):
        return {k: _resolve(v, root, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(match: re.Match) -> str:
        node: Any = root
        for part in match.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise UsageError(f"{where}: ${{{match.group(1)}}} names no key of the file; give the value instead.")
            node = node[part]
        return str(_resolve(node, root, where))
    return re.sub(r"\$\{([^}:]+)\}", lookup, value)


def _number(value: Any, kind: type, where: str, what: str) -> Any:
    """``value`` as a float or a whole int (YAML reads ``3e-4`` as a string, as torchtune's own float() takes it).

    Raises:
        UsageError: not such a number, naming ``where`` and ``what`` (the key).
    """
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
        return int(number) if kind is int else number
    except ValueError:
        raise UsageError(f"{where}: {what} {value!r} is not {'a whole number' if kind is int else 'a number'}; "
                         "give one.") from None


def _component(value: Any, where: str, what: str) -> tuple[str, dict]:
    if not isinstance(value, dict) or not isinstance(value.get("_component_"), str):
        raise UsageError(f"{where}: {what} is a mapping with a _component_ (as torchtune's config.instantiate reads).")
    return value["_component_"], {k: v for k, v in value.items() if k != "_component_"}


def _model(value: Any, where: str) -> dict[str, Any]:
    name, args = _component(value, where, "model")
    family, _, builder = name.removeprefix("torchtune.models.").rpartition(".")
    if "vision" in family or builder.startswith(("qlora_llama3_2_vision", "lora_llama3_2_vision")):
        raise UsageError(f"{where}: {name}: a vision model; qlora's torchtune reading covers text models. Train it "
                         "with qlora's own options (model, data with images) or with torchtune.")
    if not builder.startswith(("lora_", "qlora_")):
        raise UsageError(f"{where}: {name} is full fine-tuning (its builders with LoRA are lora_* and qlora_*); qlora "
                         "trains LoRA adapters on a frozen base.")
    if family == "phi3":
        raise UsageError(f"{where}: {name}: torchtune splits Phi-3's fused qkv_proj and gate_up_proj into separate "
                         "layers, each with its own LoRA; qlora adapts the checkpoint's fused layers, a different "
                         "adapter. Train it with qlora's own options (target_modules: qkv_proj,o_proj,gate_up_proj,"
                         "down_proj) or with torchtune.")
    known = {"lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
             "lora_dropout", "use_dora", "quantize_base"}
    if set(args) - known:
        raise UsageError(f"{where}: {', '.join(sorted(set(args) - known))}: not a LoRA builder argument qlora reads "
                         f"({', '.join(sorted(known))}).")
    attn = args.get("lora_attn_modules")
    if not isinstance(attn, list) or not attn or not set(attn) <= set(_TARGETS):
        raise UsageError(f"{where}: lora_attn_modules is a list of {', '.join(_TARGETS)}; got {attn!r}.")
    targets = [_TARGETS[m] for m in attn] + (list(_MLP) if args.get("apply_lora_to_mlp", False) else [])
    if args.get("apply_lora_to_output", False):
        targets.append("lm_head")
    quantized = args.get("quantize_base", builder.startswith("qlora_"))
    return {"rank": args.get("lora_rank", 8), "alpha": args.get("lora_alpha", 16),
            "dropout": args.get("lora_dropout", 0.0), "dora": args.get("use_dora", False),
            "target_modules": ",".join(targets), "quant": "nf4" if quantized else "none"}


def _checkpoint_dir(value: Any, where: str) -> str:
    name, args = _component(value, where, "checkpointer")
    if name.rpartition(".")[2] != "FullModelHFCheckpointer":
        raise UsageError(f"{where}: {name}: qlora loads transformers checkpoint folders (torchtune's "
                         "FullModelHFCheckpointer); convert the checkpoint to one and use that checkpointer.")
    if args.get("adapter_checkpoint") or args.get("recipe_checkpoint"):
        raise UsageError(f"{where}: adapter_checkpoint/recipe_checkpoint continue a torchtune run; qlora resumes its "
                         "own runs (resume: true) and continues a PEFT adapter (adapter: FOLDER). Remove them.")
    if not isinstance(args.get("checkpoint_dir"), str) or not args["checkpoint_dir"].strip():
        raise UsageError(f"{where}: the checkpointer needs checkpoint_dir, the transformers checkpoint folder to "
                         "train (torchtune requires it too); give it.")
    folder = Path(args["checkpoint_dir"])  # its checkpoint_files are the folder's weights
    return str(folder)


def _render(value: Any, where: str, template: bool) -> tuple[str, str | None, int | None]:
    """``(render, prompt template, max_seq_len)``: the tokenizer builder whose format the rows are written in (or
    ``messages``: the model's chat template, ``--template``), its prompt template (the builder's default unless
    given) and its ``max_seq_len`` (none: no cut).

    Raises:
        UsageError: a tokenizer or template qlora does not write, ``truncation_type: left``, a malformed number.
    """
    name, args = _component(value, where, "tokenizer")
    limit = args.get("max_seq_len")
    limit = None if limit is None else _number(limit, int, where, "max_seq_len")
    if args.get("truncation_type", "right") != "right":
        raise UsageError(f"{where}: truncation_type {args['truncation_type']!r}: qlora cuts a long example at its "
                         "end, as torchtune's default right truncation does; set truncation_type: right.")
    if template:
        return "messages", None, limit
    builder = name.rpartition(".")[2]
    if builder not in FAMILIES:
        raise UsageError(f"{where}: {name}: qlora writes examples as torchtune's {', '.join(FAMILIES)} do; this "
                         "tokenizer's format is not one of them. Give --template tokenizer (or auto) to train with "
                         "the model's own chat template instead.")
    chosen = args.get("prompt_template", DEFAULT_TEMPLATES.get(builder))
    if chosen is None or chosen in DEFAULT_TEMPLATES.values():
        return builder, chosen, limit
    if chosen in TEMPLATES:
        return builder, TEMPLATES[chosen], limit
    raise UsageError(f"{where}: prompt_template {chosen!r}: qlora writes torchtune's "
                     f"{', '.join(TEMPLATES)} (or none); remove it, or give --template to train with the model's own "
                     "chat template.")


def _dataset(value: Any, where: str, render: str, tokenizer: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, list):
        if len(value) != 1:
            raise UsageError(f"{where}: several datasets (torchtune's ConcatDataset); qlora reads one per torchtune "
                             "config. Give one, or list the files in qlora's own data option.")
        value = value[0]
    name, args = _component(value, where, "dataset")
    builder = name.rpartition(".")[2]
    if builder not in BUILDERS:
        raise UsageError(f"{where}: {name}: qlora reads torchtune's {', '.join(BUILDERS)}; give one of them (e.g. "
                         "chat_dataset over the same source), or qlora's own data option.")
    if args.pop("packed", False):
        raise UsageError(f"{where}: packed: true packs the examples in dataset order before shuffling; qlora packs "
                         "them in its shuffled order (packing: true), which changes the batches. Set packed: false.")
    args.pop("split_across_pack", None)
    source = args.pop("source", HUB_SOURCES.get(builder))
    files, split = args.pop("data_files", None), str(args.pop("split", "train"))
    if source is None:
        raise UsageError(f"{where}: {builder} needs a source (a hub dataset, or json/parquet/csv with data_files).")
    if source in ("json", "csv", "parquet", "text", "arrow"):
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or len(files) != 1:
            raise UsageError(f"{where}: source {source} reads data_files: give one file.")
        if split != "train":
            raise UsageError(f"{where}: split {split!r}: a data_files file is read whole as its train split; a "
                             "slice such as train[:95%] picks rows of a hub dataset. Cut the file to those rows, or "
                             "remove split.")
        # stack_exchange_paired_dataset loads with data_dir data/rl, under which load_dataset finds relative files
        source = str(Path(_STACK_EXCHANGE_DIR if builder == "stack_exchange_paired_dataset" else "") / str(files[0]))
    elif builder == "stack_exchange_paired_dataset":
        raise UsageError(f"{where}: source {source}: stack_exchange_paired_dataset reads a hub dataset's "
                         f"{_STACK_EXCHANGE_DIR} folder (load_dataset's data_dir), which qlora's hub reader does not "
                         "select; download those files and give source: json (or parquet) with data_files.")
    spec: dict[str, Any] = {"name": f"{builder} {source}", "source": source, "split": split, "subset": None,
                            "num_samples": None, "builder": builder, "render": render, **tokenizer}
    if builder == "text_completion_dataset":
        spec["columns"] = {"text": str(args.pop("column", "text"))}
        spec["add_eos"] = bool(args.pop("add_eos", True))
        if render == "messages" and not spec["add_eos"]:
            raise UsageError(f"{where}: add_eos: false with --template: qlora ends a text with the checkpoint's "
                             "EOS; leave --template out to write the texts as torchtune's tokenizer does.")
    else:
        columns = args.pop("column_map", None) or {}
        if not isinstance(columns, dict):
            raise UsageError(f"{where}: column_map {columns!r}: a mapping of torchtune's column names to the "
                             "dataset's, as {input: question, output: answer}.")
        if builder == "chat_dataset":
            style = args.pop("conversation_style", None)
            if style not in ("openai", "sharegpt"):
                raise UsageError(f"{where}: conversation_style {style!r}: torchtune's chat_dataset reads openai or "
                                 "sharegpt.")
            spec["style"] = style
            columns = {"conversations": str(args.pop("conversation_column", "conversations"))}
        if builder == "preference_dataset":
            spec["style"] = "openai"  # its ChosenRejectedToMessages reads role/content messages
        if builder == "stack_exchange_paired_dataset":  # its default map, replaced whole by a given one
            columns = columns or {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
        elif builder == "preference_dataset" and columns and not {"chosen", "rejected"} <= set(columns):
            raise UsageError(f"{where}: column_map {columns!r}: preference_dataset's map names both chosen and "
                             "rejected (torchtune requires them); add the missing one.")
        spec["columns"] = {str(k): str(v) for k, v in columns.items()}
        spec["train_on_input"] = bool(args.pop("train_on_input", builder.startswith("alpaca")))
        if builder != "stack_exchange_paired_dataset":
            spec["system_prompt"] = args.pop("new_system_prompt", None)
    if args:
        raise UsageError(f"{where}: {', '.join(sorted(args))}: not an argument of {builder} that qlora reads "
                         "(filter_fn and load_dataset options are not); remove it.")
    return {"data": json.dumps([{"torchtune": spec}]), "train_on": "assistant", "format": "auto"}


def _seq_len(limit: int | None, model: str, render: str, data: str) -> int:
    """qlora's seq_len for torchtune's ``max_seq_len`` (none: no limit, the model's context). torchtune cuts a
    conversation to ``max_seq_len`` tokens, its last one an EOS: untrained for Llama 3 and Qwen (qlora keeps one
    token less), trained as the message it cuts for the SentencePiece tokenizers (their rows are cut already,
    :mod:`qlora.train.data.torchtune_tokenizers`); and a text (``text_completion_dataset``) to one token less."""
    if limit is None:
        config = Path(model) / "config.json"
        context = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings") if config.is_file() \
            else None
        return int(context or 131072)
    if render == "messages" or (json.loads(data)[0]["torchtune"]["builder"] != "text_completion_dataset"
                                and FAMILIES[render] == "sentencepiece"):
        return limit
    return limit - 1


def _optimizer(value: Any, where: str) -> dict[str, Any]:
    name, args = _component(value, where, "optimizer")
    if name not in _OPTIMIZERS:
        raise UsageError(f"{where}: {name}: qlora's optimizers are {', '.join(_OPTIMIZERS)}; pick one.")
    args.pop("fused", None)  # a kernel choice
    out = {"optim": _OPTIMIZERS[name], "lr": _number(args.pop("lr", 1e-3), float, where, "lr"),
           "weight_decay": _number(args.pop("weight_decay", 0.01), float, where, "weight_decay")}
    betas = args.pop("betas", None)
    if betas is not None:
        if not isinstance(betas, list) or len(betas) != 2:
            raise UsageError(f"{where}: betas {betas!r}: AdamW's betas are two numbers, as [0.9, 0.999].")
        out["adam_beta1"], out["adam_beta2"] = (_number(b, float, where, "betas") for b in betas)
    if "eps" in args:
        out["adam_epsilon"] = _number(args.pop("eps"), float, where, "eps")
    if args:
        raise UsageError(f"{where}: {', '.join(sorted(args))}: not an AdamW argument qlora has (lr, betas, eps, "
                         "weight_decay, fused); remove it.")
    return out


def _schedule(value: Any, where: str) -> dict[str, Any]:
    if value is None:  # the recipe's rate stays constant without one
        return {"lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0}
    name, args = _component(value, where, "lr_scheduler")
    if name != _COSINE:
        raise UsageError(f"{where}: {name}: qlora runs torchtune's get_cosine_schedule_with_warmup (transformers' "
                         "cosine); use it, or qlora's own lr_scheduler.")
    if "num_warmup_steps" not in args:
        raise UsageError(f"{where}: {name} needs num_warmup_steps (torchtune's builder requires it); give it, 0 for "
                         "none.")
    out = {"lr_scheduler": "cosine", "warmup_steps": _number(args.pop("num_warmup_steps"), int, where,
                                                             "num_warmup_steps"), "warmup_ratio": 0.0}
    cycles = args.pop("num_cycles", 0.5)
    if cycles != 0.5:
        out["lr_scheduler_kwargs"] = {"num_cycles": cycles}
    if args:
        raise UsageError(f"{where}: {', '.join(sorted(args))}: the recipe sets it (num_training_steps) or qlora has "
                         "no such option; remove it.")
    return out


def _loss(value: Any, where: str, preference: bool) -> dict[str, Any]:
    """qlora's method and loss options for the recipe's ``loss`` (``preference``: its dataset is preference pairs,
    lora_dpo's)."""
    name, args = _component(value, where, "loss")
    if name in _PREFERENCE_LOSSES:
        if not preference:
            raise UsageError(f"{where}: {name} is lora_dpo's loss, but the dataset is not preference pairs; give "
                             f"one of {', '.join(PREFERENCE_BUILDERS)}, or a cross-entropy loss.")
        loss_type, strength = _PREFERENCE_LOSSES[name]
        out = {"method": "dpo", "loss_type": loss_type,
               "beta": _number(args.pop(strength, 0.1), float, where, strength)}
        if name.endswith("DPOLoss"):
            out["label_smoothing"] = _number(args.pop("label_smoothing", 0.0), float, where, "label_smoothing")
        if args:
            raise UsageError(f"{where}: {', '.join(sorted(args))}: not an argument of {name}; remove it.")
        return out
    if name not in _LOSSES:
        raise UsageError(f"{where}: {name}: qlora trains the next-token cross-entropy ({', '.join(_LOSSES)}, the "
                         f"same loss computed in chunks or not) and lora_dpo's {', '.join(_PREFERENCE_LOSSES)}; "
                         "other losses are torchtune's own recipes. Use one of those.")
    if preference:
        raise UsageError(f"{where}: {name} with a preference dataset: lora_dpo trains pairs with "
                         f"{', '.join(_PREFERENCE_LOSSES)}; give one of them.")
    return {}


# qlora's options that _training reads from a top-level key of another name
_TRAINING_KEYS = {"grad_accum": "gradient_accumulation_steps", "precision": "dtype", "max_grad_norm": "clip_grad_norm",
                  "gradient_checkpointing": "enable_activation_checkpointing", "output": "output_dir"}


def _training(cfg: dict, where: dict[str, str]) -> dict[str, Any]:
    if cfg.get("shuffle", True) is not True:
        raise UsageError(f"{where['shuffle']}: shuffle false: qlora draws each epoch in a seeded random order; set "
                         "shuffle: true.")
    if cfg.get("resume_from_checkpoint"):
        raise UsageError(f"{where['resume_from_checkpoint']}: resume_from_checkpoint true continues a torchtune run; "
                         "qlora resumes its own from its output folder (resume: true). Set it to false.")
    dtype = cfg.get("dtype", "bf16")
    if dtype not in _DTYPES:
        raise UsageError(f"{where.get('dtype')}: dtype {dtype!r}: torchtune's LoRA recipes train in bf16 or fp32.")
    out: dict[str, Any] = {"batch_size": cfg.get("batch_size"), "grad_accum": cfg.get("gradient_accumulation_steps", 1),
                           "epochs": cfg.get("epochs"), "precision": _DTYPES[dtype],
                           "max_grad_norm": _number(cfg.get("clip_grad_norm") or 0.0, float,
                                                    where.get("clip_grad_norm", ""), "clip_grad_norm"),
                           "gradient_checkpointing": bool(cfg.get("enable_activation_checkpointing", False)),
                           "output": cfg.get("output_dir")}
    if cfg.get("seed") is not None:
        out["seed"] = cfg["seed"]
    out["max_steps_per_epoch"] = cfg.get("max_steps_per_epoch") or 0
    return {k: v for k, v in out.items() if v is not None}
