"""TRL's config files (``trl sft|dpo --config FILE``) and alignment-handbook's recipes, read as those tools read them.

Both are TRL's argument dataclasses in one YAML file: ``ModelConfig`` (``model_revision``, ``dtype``/``torch_dtype``,
``use_peft``, ``lora_*``, ``load_in_4bit``), ``ScriptArguments`` (``dataset_name``, ``dataset_config``, splits; the
handbook adds ``dataset_mixture``, earlier ``dataset_mixer`` with ``dataset_splits``) and the trainer's config
(``SFTConfig``, ``DPOConfig``: transformers' ``TrainingArguments`` with TRL's changed defaults). Where a file is
silent, TRL's defaults apply, not qlora's. Which trainer runs is the command's choice (``trl dpo``, the handbook's
``dpo.py``), not the file's: a file with a preference trainer's keys needs ``method`` said.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qlora.errors import UsageError
from qlora.template_file import is_inline
from qlora.train.foreign_keys import silent_defaults

# Keys only TRL's ModelConfig and ScriptArguments (and the handbook's extension of them) have.
_TRL_KEYS = frozenset({"use_peft", "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
                       "dataset_mixture", "dataset_mixer", "dataset_splits", "model_revision", "torch_dtype", "dtype",
                       "lora_task_type", "use_bnb_nested_quant"})
# Keys of TRL's preference trainers' configs (DPOConfig, ORPOConfig, CPOConfig, KTOConfig) that SFTConfig lacks.
_PREFERENCE_KEYS = ("beta", "max_prompt_length", "max_completion_length", "precompute_ref_log_probs", "rpo_alpha",
                    "loss_weights", "label_smoothing", "ref_model_init_kwargs", "reference_free", "use_weighting",
                    "ld_alpha", "f_divergence_type", "cpo_alpha", "simpo_gamma", "desirable_weight",
                    "undesirable_weight")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "auto": None}
# TRL's defaults where they differ from qlora's: TrainingArguments' linear schedule, no warmup, max_grad_norm 1.0,
# torch's AdamW, 3 epochs of batches of 8; ModelConfig's lora_alpha 32; the trainers' max_length 1024 and gradient
# checkpointing on; SFTConfig's learning rate 2e-5, the preference configs' 1e-6 with every dropout off;
# TrainingArguments' save_strategy steps (every save_steps, 500 unless given).
TRL_DEFAULTS = {"lr_scheduler": "linear", "warmup_ratio": 0.0, "max_grad_norm": 1.0, "optim": "adamw",
                "epochs": 3.0, "batch_size": 8, "alpha": 32.0, "seq_len": 1024, "gradient_checkpointing": True,
                "save_strategy": "steps"}
_METHOD_DEFAULTS = {"sft": {"lr": 2e-5, "train_on": "completion"}, "preference": {"lr": 1e-6}}


def is_trl(loaded: dict) -> bool:
    """Whether a config file is TRL's or alignment-handbook's: ModelConfig's ``model_name_or_path`` (not qlora's
    ``model``) and a key only their argument classes have."""
    return "model_name_or_path" in loaded and "model" not in loaded and bool(_TRL_KEYS & set(loaded))


def trl_options(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """The file's keys with TRL's and the handbook's that need reading together translated to qlora's (the
    others are aliases or :mod:`qlora.train.foreign_keys`'); what qlora cannot do as they do is refused by line.

    Raises:
        UsageError: full fine-tuning, a model revision, a dtype unlike the precision keys, a chat template folder
            whose end token is not the model's, or a mixture qlora cannot read as the handbook does.
    """
    where = {k: f"{path} line {lines.get(k, '?')}" for k in loaded}
    out = dict(loaded)
    if "use_peft" not in loaded:
        first = min((k for k in loaded if k in _TRL_KEYS), key=lambda k: lines.get(k, 0))
        raise UsageError(f"{where[first]}: {first} makes this a TRL (or alignment-handbook) file, and without "
                         "use_peft: true TRL fine-tunes the whole model; qlora trains LoRA adapters on a frozen base: "
                         "add use_peft: true (and load_in_4bit: true for a 4-bit base), with lora_target_modules.")
    targets = loaded.get("lora_target_modules") or loaded.get("target_modules")
    if loaded.get("use_peft") is True and not targets:
        raise UsageError(f"{where['use_peft']}: use_peft without lora_target_modules: TRL then adapts PEFT's default "
                         "layers for the model's type (q_proj and v_proj for Llama, Mistral, Qwen2, Gemma), which "
                         "qlora does not guess; name them: lora_target_modules: [q_proj, v_proj] (or all-linear).")
    revision = out.pop("model_revision", None)
    if revision not in (None, "main"):
        raise UsageError(f"{where['model_revision']}: model_revision {revision!r}: qlora loads a hub model's main "
                         "revision; download that revision into a folder (hf download MODEL --revision "
                         f"{revision} --local-dir DIR) and give the folder as model_name_or_path.")
    task = out.pop("lora_task_type", None)
    if task not in (None, "CAUSAL_LM"):
        raise UsageError(f"{where['lora_task_type']}: lora_task_type {task!r}: qlora trains causal language models "
                         "(CAUSAL_LM); remove the key.")
    _dtype(loaded, out, where)
    if loaded.get("disable_dropout") is True and loaded.get("lora_dropout") not in (None, 0, 0.0):
        del out["lora_dropout"]  # TRL zeroes every dropout after the LoRA layers are built, lora_dropout's too
        print(f"qlora train: {where['lora_dropout']}: lora_dropout {loaded['lora_dropout']} is 0 under "
              "disable_dropout: true, as TRL runs it", file=sys.stderr)
    _chat_template(loaded, out, where)
    if loaded.get("eos_token") is not None and loaded["eos_token"] == _own(loaded, "eos_token"):
        del out["eos_token"]  # the tokenizer's own: SFTConfig's eos_token changes nothing then
    if loaded.get("max_prompt_length") is not None:
        raise UsageError(f"{where['max_prompt_length']}: max_prompt_length: TRL's DPO once cut prompts to it (keeping "
                         "their end) before max_length; TRL 1.x removed it, and qlora, as TRL now, cuts prompt and "
                         "answer together to max_length keeping their start. Remove the key (prompts longer than "
                         f"{loaded['max_prompt_length']} tokens are cut otherwise than the recipe's TRL cut them).")
    if "dataset_mixture" in loaded:
        _mixture(loaded, out, lines, where)
    elif "dataset_mixer" in loaded:
        _mixer(loaded, out, lines, where)
    elif "dataset_splits" in loaded:
        raise UsageError(f"{where['dataset_splits']}: dataset_splits names the splits of dataset_mixer, which this "
                         "file lacks; use dataset_name with dataset_train_split instead.")
    if loaded.get("dataset_name") and loaded.get("eval_strategy", "no") not in ("no", False) and "eval_data" not in out:
        out["eval_data"] = loaded["dataset_name"]  # TRL's scripts evaluate on its dataset_test_split
        lines.setdefault("eval_data", lines.get("eval_strategy", 0))
    return out


def loss_keys(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """SFTConfig's ``assistant_only_loss`` (default false) and ``completion_only_loss`` (default: true for
    prompt-completion rows) read together as qlora's ``train_on``: the assistant turns; all tokens; or all but the
    prompts of prompt-completion rows (``completion``)."""
    keys = [k for k in ("assistant_only_loss", "completion_only_loss") if loaded.get(k) is not None]
    if not keys:
        return loaded
    for key in keys:
        if not isinstance(loaded[key], bool):
            raise UsageError(f"{path} line {lines.get(key, '?')}: {key} expects true or false; got "
                             f"{loaded[key]!r}.")
    other = next((k for k in ("train_on", "train_on_inputs", "train_on_prompt") if k in loaded), None)
    if other:
        raise UsageError(f"{path} line {lines.get(keys[0], '?')}: {keys[0]} and {other} both set train_on; keep one.")
    out = {k: v for k, v in loaded.items() if k not in ("assistant_only_loss", "completion_only_loss")}
    completion = loaded.get("completion_only_loss")
    out["train_on"] = ("assistant" if loaded.get("assistant_only_loss") else "all" if completion is False
                       else "completion")
    lines.setdefault("train_on", lines.get(keys[0], 0))
    return out


def preference_keys(loaded: dict) -> list[str]:
    """The preference trainers' keys a TRL file sets (it then needs a preference method)."""
    return [k for k in _PREFERENCE_KEYS if loaded.get(k) is not None]


def trl_defaults(values: dict[str, Any], path: Path, file_keys: set[str], flags: set[str]) -> None:
    """TRL's defaults for the options ``values`` leaves unset, for its method (given by the file or a flag).
    A preference trainer's ``disable_dropout`` (true unless the file says otherwise) zeroes every dropout of the
    PEFT model, ``lora_dropout`` included, unless ``--dropout`` is given as a flag."""
    method = "sft" if values.get("method", "sft") == "sft" else "preference"
    silent_defaults(values, TRL_DEFAULTS | _METHOD_DEFAULTS[method], path, "a TRL")
    if method == "preference" and "disable_dropout" not in file_keys and "dropout" not in flags and values.get(
            "dropout") != 0.0:
        values["dropout"] = 0.0  # TRL's disable_dropout runs after the LoRA layers are in place
        print(f"qlora train: {path}: lora_dropout 0: TRL's preference trainers disable every dropout of the model "
              "(disable_dropout, true unless the file sets it false), LoRA's too", file=sys.stderr)


def _dtype(loaded: dict, out: dict, where: dict[str, str]) -> None:
    """ModelConfig's ``dtype`` (``torch_dtype`` before) loads the weights in that type; with 4 bits it is also the
    compute type. It is qlora's precision unless ``bf16``/``fp16`` (the autocast type) say it, which it must agree
    with (float32 master weights under bf16 autocast are what qlora's precision bf16 does too)."""
    key = next((k for k in ("dtype", "torch_dtype") if loaded.get(k) is not None), None)
    if key is None:
        return
    if "dtype" in loaded and "torch_dtype" in loaded:
        raise UsageError(f"{where['torch_dtype']}: torch_dtype and dtype both set the model's dtype; keep dtype.")
    out.pop(key)
    value = loaded[key]
    if value not in _DTYPES:
        raise UsageError(f"{where[key]}: {key} {value!r}: expects one of {', '.join(_DTYPES)}.")
    ours = _DTYPES[value]
    autocast = next((k for k in ("bf16", "fp16") if loaded.get(k) is True), None)
    if autocast and ours not in (None, "fp32", autocast):
        raise UsageError(f"{where[key]}: {key} {value} with {autocast}: true: the weights in one type and the "
                         "compute in another; keep one.")
    if ours in ("bf16", "fp16") and not autocast:
        out["precision"] = ours  # float32 weights compute under TRL's bf16 autocast (its default): precision auto


def _chat_template(loaded: dict, out: dict, where: dict[str, str]) -> None:
    """The handbook's ``chat_template`` (a Jinja template set on the tokenizer) and SFTConfig's
    ``chat_template_path`` (a ``.jinja`` file set on the tokenizer, or a tokenizer folder whose template TRL clones)
    are the template to train with (:mod:`qlora.template_file`); the local model's own is ``template: tokenizer``."""
    text = loaded.get("chat_template")
    inline = isinstance(text, str) and is_inline(text)
    file = loaded.get("chat_template_path")
    if file is not None:
        if inline:
            raise UsageError(f"{where['chat_template_path']}: chat_template_path and chat_template both set the chat "
                             "template; keep one.")
        if not isinstance(file, str) or not file:
            raise UsageError(f"{where['chat_template_path']}: chat_template_path is a .jinja file or a tokenizer "
                             f"folder; got {file!r}.")
        _cloned_eos(loaded, file, where['chat_template_path'])
    elif inline:
        out["chat_template"] = "tokenizer" if _own(loaded, "chat_template") == text else text


def _cloned_eos(loaded: dict, file: str, at: str) -> None:
    """TRL clones a tokenizer folder's template together with its end token (``clone_chat_template`` makes it the
    model's EOS, adding it to the vocabulary); qlora takes the template alone, which renders the same only when the
    folder's end token is the model's own."""
    folder = Path(file).expanduser()
    if not folder.is_dir():
        return
    theirs, ours = _own({"model_name_or_path": folder}, "eos_token"), _own(loaded, "eos_token")
    if theirs is not None and ours is not None and theirs != ours:
        raise UsageError(f"{at}: chat_template_path {file} is a tokenizer folder whose end token {theirs!r} is not "
                         f"the model's ({ours!r}); TRL then makes it the model's end token and adds it to the "
                         "vocabulary, which qlora does not. Give its chat_template.jinja file instead (TRL sets a "
                         "file's template alone), with add_special_tokens for the tokens the template needs.")


def _own(loaded: dict, key: str) -> Any:
    """The local model folder's own tokenizer setting ``key`` (its chat_template.jinja for the template), or None."""
    model = Path(str(loaded.get("model_name_or_path") or "")).expanduser()
    if key == "chat_template" and (model / "chat_template.jinja").is_file():
        return (model / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        value = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8")).get(key)
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # no local model, or the model load reports an unreadable tokenizer
    return value.get("content") if isinstance(value, dict) else value


def _entry(dataset: Any, split: str, subset: Any, columns: Any = None, fraction: Any = 1.0,
           seed: int | None = None) -> dict[str, Any]:
    return {"handbook": {"name": dataset, "source": dataset, "split": split, "subset": subset, "num_samples": None,
                         "columns": columns, "fraction": fraction, "shuffle_seed": seed}}


def _mixture(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """Today's ``dataset_mixture``: its datasets as the training data, ``test_split_size`` held out of them."""
    mixture, at = out.pop("dataset_mixture"), where["dataset_mixture"]
    items = mixture.get("datasets") if isinstance(mixture, dict) else None
    if not isinstance(items, list) or not items or not all(isinstance(d, dict) and d.get("id") for d in items):
        raise UsageError(f"{at}: dataset_mixture is a mapping with datasets: a list of {{id, config, split, columns, "
                         "weight}}, as the handbook reads it.")
    unknown = sorted(set(mixture) - {"datasets", "seed", "test_split_size"})
    unknown += sorted({k for d in items for k in d} - {"id", "config", "split", "columns", "weight"})
    if unknown:
        raise UsageError(f"{at}: dataset_mixture: {', '.join(unknown)}: not a key the handbook reads; remove it.")
    columns = [tuple(d["columns"]) for d in items if d.get("columns") is not None]
    if len(set(columns)) > 1:
        raise UsageError(f"{at}: dataset_mixture: its datasets keep different columns; the handbook requires the "
                         "same columns in every dataset of a mixture.")
    seed = mixture.get("seed", 0)
    for d in items:
        weight = d.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight <= 1:
            raise UsageError(f"{at}: dataset_mixture: {d['id']} weight {weight!r}: a share of its rows above 0 and "
                             "at most 1, as the handbook draws them.")
    for key in ("dataset_name", "dataset_config"):
        if loaded.get(key) is not None:
            raise UsageError(f"{where[key]}: {key} with dataset_mixture: the handbook trains on the mixture then and "
                             f"ignores {key}; keep one.")
    out["data"] = json.dumps([_entry(d["id"], str(d.get("split", "train")), d.get("config"), d.get("columns"),
                                     d.get("weight", 1.0), seed) for d in items])
    lines.setdefault("data", lines.get("dataset_mixture", 0))
    size = mixture.get("test_split_size")
    if size is not None:
        if "eval_split" in out or "val_set_size" in out:
            raise UsageError(f"{at}: dataset_mixture's test_split_size and eval_split both hold out data; keep one.")
        out["eval_split"] = size
        lines.setdefault("eval_split", lines.get("dataset_mixture", 0))


def _mixer(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """The handbook's earlier ``dataset_mixer`` over ``dataset_splits`` (default train, test) and
    ``dataset_configs``: the train splits are the training data, the test splits the eval data."""
    mixer, at = out.pop("dataset_mixer"), where["dataset_mixer"]
    splits = out.pop("dataset_splits", None) or ["train", "test"]
    configs = out.pop("dataset_configs", None) or [None] * (len(mixer) if isinstance(mixer, dict) else 0)
    if not isinstance(mixer, dict) or not mixer:
        raise UsageError(f"{at}: dataset_mixer is a mapping of dataset ids to the share of their train rows.")
    if not isinstance(splits, list) or not all(isinstance(s, str) and ("train" in s or "test" in s) for s in splits):
        raise UsageError(f"{where.get('dataset_splits', at)}: dataset_splits is a list of split names holding train "
                         f"or test (the handbook's rule); got {splits!r}.")
    if not isinstance(configs, list) or len(configs) != len(mixer):
        raise UsageError(f"{where.get('dataset_configs', at)}: dataset_configs needs one config name for each dataset "
                         "of dataset_mixer.")
    for name, fraction in mixer.items():
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise UsageError(f"{at}: dataset_mixer: {name} {fraction!r}: the share of its train rows, 0 to 1.")
    train = [_entry(n, s, c, fraction=f) for (n, f), c in zip(mixer.items(), configs) for s in splits if "train" in s]
    test = [_entry(n, s, c) for n, c in zip(mixer, configs) for s in splits if "train" not in s]
    if not train:
        raise UsageError(f"{where.get('dataset_splits', at)}: dataset_splits has no train split to train on.")
    out["data"] = json.dumps(train)
    lines.setdefault("data", lines.get("dataset_mixer", 0))
    if test:
        out["eval_data"] = json.dumps(test)
        lines.setdefault("eval_data", lines.get("dataset_splits", 0))
