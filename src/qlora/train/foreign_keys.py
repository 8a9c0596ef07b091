"""Keys of other tools' YAML files whose values need translating, or that change nothing here.

Users bring their LLaMA-Factory, transformers ``TrainingArguments``, TRL and axolotl
configs. Keys that only rename one of ours are plain aliases
(:data:`qlora.train.config.ALIASES`); this module handles the rest:

- keys whose *values* differ: LLaMA-Factory's ``quantization_bit: 4``, ``finetuning_type: lora``,
  ``lora_target: all``, its template names (its ``stage`` and ``pref_loss``, which decide the
  method together, are read by :func:`qlora.train.config.load_config`); axolotl's ``datasets:``
  list (:mod:`qlora.train.data.axolotl_datasets`, its types read with ``rl``), ``rl``, chat template names,
  and its ``adapter``/``load_in_4bit`` (and TRL's ``use_peft``), ``saves_per_epoch``/``evals_per_epoch`` (shares
  of the run's steps), read together by :func:`adapter_keys`;
  TRL's ``dataset_text_field`` and ``truncation_mode``;
- settings of the other tool's runtime that do not change what a run computes
  (worker counts, caches, timeouts, report sinks): passed over, and the run says which;
- values qlora has no equivalent for (8-bit quantization, full fine-tuning, PPO, Ray, a trained vision tower or
  projector, image crops or resizes other than LLaMA-Factory's pixel bounds): refused by name, instead of
  training something else than the file asks. LLaMA-Factory's ``image_max_pixels``/``image_min_pixels`` are our
  options of the same names; its ``media_dir`` is ours; its video and audio settings are passed over (rows with
  videos or audios are refused when the data are read).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from qlora.errors import UsageError
from qlora.train.data.axolotl_datasets import axolotl_datasets
from qlora.template_file import is_custom, own_value
from qlora.template_names import template_name

Translation = tuple[list[tuple[str, Any]], str]  # our (option, value) pairs, and a note for the user ("" if none)

# Settings of the other tool's runtime: they change speed, logging or caching, never the result.
RUNTIME_ONLY = frozenset({
    "do_eval", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "ddp_timeout", "ddp_find_unused_parameters",
    "plot_loss", "report_to", "logging_dir", "run_name", "save_only_model", "trust_remote_code", "flash_attn",
    "disable_tqdm", "use_fast_tokenizer", "tokenized_path", "per_device_eval_batch_size", "eval_batch_size",
    "include_num_input_tokens_seen", "remove_unused_columns", "logging_first_step", "save_safetensors",
    "quantization_device_map", "low_cpu_mem_usage", "bnb_4bit_quant_storage", "enable_liger_kernel", "use_unsloth",
    "use_unsloth_gc", "print_param_status", "deepspeed", "use_v1_kernels",
    # axolotl: model/tokenizer classes, caches, attention kernels, padding of packed rows (masked out of the
    # loss), eval tables, logging sinks, hub pushes, loss watchdog
    "model_type", "tokenizer_type", "strict", "dataset_prepared_path", "pad_to_sequence_len", "eval_sample_packing",
    "tf32", "flash_attention", "xformers_attention", "sdp_attention", "flash_attn_cross_entropy",
    "flash_attn_rms_norm", "flash_attn_fuse_qkv", "flash_attn_fuse_mlp", "eval_table_size",
    "eval_table_max_new_tokens", "local_rank", "debug", "is_mistral_derived_model",
    "is_llama_derived_model", "is_qwen_derived_model", "is_falcon_derived_model", "hub_model_id", "hub_strategy",
    "loss_watchdog_threshold", "loss_watchdog_patience", "fsdp_config", "dataset_processes",
    "use_tensorboard", "tokenizer_use_fast", "tokenizer_legacy",
    "skip_prepare_dataset",  # its vision examples' switch off its dataset preparation cache
    # TRL's SFTConfig: preprocessing workers, padding-free batches (the same loss without pad tokens)
    "dataset_num_proc", "padding_free", "pad_token", "ignore_bias_buffers",
    # TRL's DPOConfig: padding (masked out of the loss), the batch size of the reference pass, activation offloading
    # (memory, not math), and TR-DPO's settings, inert without its sync_ref_model (refused when on)
    "pad_to_multiple_of", "precompute_ref_batch_size", "activation_offloading", "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    # axolotl's kernels of the same maths: reentrant or not checkpointing, its LoRA autograd functions, Liger's
    # fused layers and losses, MoE expert kernels; SwanLab logging
    "gradient_checkpointing_kwargs", "lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "liger_rms_norm",
    "liger_glu_activation", "liger_layer_norm", "liger_rope", "liger_cross_entropy", "liger_fused_linear_cross_entropy",
    "use_kernels", "use_scattermoe", "use_sonicmoe", "use_swanlab",
    # axolotl: where adapters are loaded (CPU), FSDP's sharded 4-bit loading, how a later merge runs; its freeze of a
    # multimodal model's towers and projector (requires_grad), which a LoRA run never trains whole either way
    "lora_on_cpu", "qlora_sharded_model_loading", "merge_method", "freeze_mm_modules",
    # LLaMA-Factory: reentrant gradient checkpointing; each eval dataset's loss, which qlora records beside the whole's
    "use_reentrant_gc", "eval_on_each_dataset",
    # TrainingArguments (TRL's and alignment-handbook's files): log verbosity, Liger's kernels, the upload of the
    # result to the hub (qlora writes it to output_dir; hub_* settings are passed over by their prefix)
    "log_level", "log_level_replica", "use_liger_kernel", "push_to_hub", "use_flash_attention_2",
})
# Prefixes of logging sinks' and hub uploads' settings (wandb_project, axolotl's swanlab_project, hub_model_id, ...).
RUNTIME_PREFIXES = ("wandb_", "swanlab_", "mlflow_", "comet_", "hub_")
# LLaMA-Factory's settings of videos and audio: they apply to rows with videos or audios, which qlora refuses when
# it reads the data (its vision examples set them beside images all the same).
VIDEO_AUDIO = frozenset({
    "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
})


# Keys translated to nothing that still choose something: LLaMA-Factory's quantization_bit: 4 is the 4-bit base, where
# a file without it trains a 16-bit one (its defaults are chosen from it), so it is not named as passed over.
READ_WITH_DEFAULTS = frozenset({"quantization_bit"})


def _quantization_bit(value: Any, where: str) -> Translation:
    if value is None or value == 4:
        return [], ""  # qlora's base is 4-bit unless quant: none
    raise UsageError(f"{where}: quantization_bit {value!r}: qlora stores the base model in 4 bits (quant: nf4 or "
                     "fp4) or keeps it 16-bit (quant: none); set quantization_bit: 4 or remove it.")


def _quantization_method(value: Any, where: str) -> Translation:
    if value in (None, "bnb", "bitsandbytes"):
        return [], ""  # qlora's NF4/FP4 are bitsandbytes' formats, bit for bit
    raise UsageError(f"{where}: quantization_method {value!r}: qlora quantizes as bitsandbytes does (NF4/FP4 with "
                     "double quantization); remove the key or set it to bnb.")


def _finetuning_type(value: Any, where: str) -> Translation:
    if value in (None, "lora"):
        return [], ""
    raise UsageError(f"{where}: finetuning_type {value!r}: qlora trains LoRA adapters (and DoRA, AdaLoRA) on a "
                     "frozen base; for full or frozen-layer fine-tuning use another tool.")


def _lora_target(value: Any, where: str) -> Translation:
    return [("target_modules", "all-linear" if value == "all" else value)], ""


# LLaMA-Factory's templates whose multimodal plugin is its Qwen2-VL one (or a subclass: Qwen3-VL's, GLM-4V's,
# Qwen-Omni's), which resizes every image after the pixel bounds (qlora's image_resize: qwen2-vl).
_QWEN2_VL_PLUGIN_TEMPLATES = frozenset({
    "qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "qwen3_5", "qwen3_5_nothink", "qwen3_6", "glm4v", "glm4_5v",
    "glm_ocr", "keye_vl", "mimo_vl", "dots_ocr", "qwen2_omni", "qwen3_omni", "qwen3_omni_nothink",
})


def _template_of(tool: str) -> Callable[[Any, str], Translation]:
    key = "template" if tool == "LLaMA-Factory" else "chat_template"

    def translate_template(value: Any, where: str) -> Translation:
        """A name with a built-in equivalent (qlora.template_names: llama3, tokenizer_default, ...) is taken;
        the tool's other names are a model family's own format."""
        if not isinstance(value, str) or is_custom(value):  # the user's own template: qlora.template_file
            return [("template", value)], ""
        try:
            return [("template", template_name(value))], ""
        except ValueError:
            pass
        if value == "jinja":
            raise UsageError(f"{where}: {key} jinja takes its template from chat_template_jinja (the template's text "
                             "or a .jinja file), which this file lacks; add it, or name a template.")
        if value.startswith("tokenizer_default_fallback_"):
            raise UsageError(f"{where}: {key} {value!r}: qlora's templates are the model's own (template: "
                             "tokenizer), auto (the model's own, else chatml or llama-3 by the vocabulary's markers, "
                             "else alpaca), chatml, llama-3 and alpaca, or your own .jinja file; choose one.")
        qwen2_vl = tool == "LLaMA-Factory" and value in _QWEN2_VL_PLUGIN_TEMPLATES
        resize = [("image_resize", "qwen2-vl")] if qwen2_vl else []
        return [("template", "auto"), *resize], (f"{where}: {key} {value!r} is a {tool} name; training with the "
                                                 "model's own chat template (template: auto), the format that "
                                                 "template writes for its model family"
                                                 + (", and its images resized as LLaMA-Factory's Qwen2-VL plugin "
                                                    "resizes them (image_resize: qwen2-vl)" if resize else ""))
    return translate_template


def _resume(value: Any, where: str) -> Translation:
    if value in (None, False):
        return [], ""
    raise UsageError(f"{where}: resume_from_checkpoint {value!r}: qlora resumes a run from the latest checkpoint in "
                     "its output folder; set resume: true (and output to that run's folder) instead.")


def _do_train(value: Any, where: str) -> Translation:
    if value is False:
        raise UsageError(f"{where}: do_train false: this LLaMA-Factory file does not train (it evaluates or "
                         "predicts); qlora train always trains. Use qlora eval (loss, perplexity) or qlora generate "
                         "with the adapter instead, or set do_train: true.")
    return [], ""


def _adapter_name_or_path(value: Any, where: str) -> Translation:
    if isinstance(value, str) and "," in value:
        raise UsageError(f"{where}: adapter_name_or_path {value!r}: several adapters, which LLaMA-Factory merges "
                         "into the base but the last; qlora continues one adapter. Merge the others first (qlora "
                         "merge) and give the merged model as model_name_or_path.")
    return [("adapter", value)], ""


def _ray_num_workers(value: Any, where: str) -> Translation:
    raise UsageError(f"{where}: ray_num_workers {value!r}: LLaMA-Factory's Ray launcher; qlora runs on several GPUs "
                     f"under torchrun (qlora train --nproc {value} ...), where the global batch is, as with Ray, "
                     "the batch per GPU times the GPUs times gradient_accumulation_steps. Remove the key and give "
                     "--nproc instead.")


def _datasets(option: str) -> Callable[[Any, str], Translation]:
    """The list as JSON text; :func:`adapter_keys` has checked it, with the method that decides its types."""
    def translate_datasets(value: Any, where: str) -> Translation:
        return [(option, json.dumps(value))], ""
    return translate_datasets


# axolotl's rl: TRL's trainer it runs, as qlora's (method, loss type). Its simpo is TRL's CPOTrainer with loss
# simpo and CPOConfig's cpo_alpha (1 unless set): qlora's --method cpo --loss-type simpo.
_RL = {"dpo": ("dpo", ""), "ipo": ("dpo", "ipo"), "orpo": ("orpo", ""), "kto": ("kto", ""), "simpo": ("cpo", "simpo")}


def _rl(value: Any, where: str) -> Translation:
    if value in (None, False):
        return [], ""
    if value not in _RL:
        raise UsageError(f"{where}: rl {value!r} has no qlora counterpart; qlora trains rl {', '.join(_RL)} "
                         "(as method dpo, orpo, kto, cpo).")
    method, loss = _RL[value]
    return [("method", method)] + ([("loss_type", loss)] if loss else []), ""


def _refused(key: str, why: str) -> Callable[[Any, str], Translation]:
    """A key whose setting qlora has no equivalent for; its off values (false, 0, empty) change nothing."""
    def refuse(value: Any, where: str) -> Translation:
        if not value:
            return [], ""
        shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as the YAML file spells it
        raise UsageError(f"{where}: {key} {shown}: {why}")
    return refuse


def _frozen(key: str, ours: bool, why: str) -> Callable[[Any, str], Translation]:
    """A switch whose one value is what qlora does (``ours``), as LLaMA-Factory's freeze switches of a part of a
    vision-language model."""
    def translate_frozen(value: Any, where: str) -> Translation:
        if value is ours:
            return [], ""
        shown = str(value).lower() if isinstance(value, bool) else repr(value)
        raise UsageError(f"{where}: {key} {shown}: {why}")
    return translate_frozen


def _save_on_each_node(value: Any, where: str) -> Translation:
    """TrainingArguments' ``save_on_each_node``: every node's main process writes the checkpoints, for nodes without
    a shared disk. qlora writes them once, from rank 0: the same on one node; over several, --output must be a
    folder every node sees (docs/distributed.md), so the key is refused there."""
    if not value:
        return [], ""
    world, local = (int(os.environ.get(k, "1") or 1) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if world > local:
        raise UsageError(f"{where}: save_on_each_node true: this run spans {world // local} nodes, and qlora writes "
                         "checkpoints and the adapter once, from rank 0, into --output, which every node must see "
                         "(a shared filesystem: docs/distributed.md). Put output_dir there and remove the key.")
    return [], (f"{where}: save_on_each_node true: on one node qlora's checkpoints are the node's already (written "
                "once, by rank 0)")


# LLaMA-Factory's switches of optimizers other than AdamW.
_OTHER_OPTIMIZERS = {"use_adam_mini": "Adam-mini", "use_galore": "GaLore", "use_apollo": "APOLLO",
                     "use_badam": "BAdam", "use_muon": "Muon"}


def _other_optimizer(key: str) -> Callable[[Any, str], Translation]:
    return _refused(key, f"LLaMA-Factory's {_OTHER_OPTIMIZERS[key]} optimizer, which qlora does not have; it trains "
                         "with AdamW (optim: adamw_torch, adamw_8bit, paged_adamw_32bit or paged_adamw_8bit, the "
                         "8-bit and paged ones for less memory). Remove the key or set it to false, and choose "
                         "optim.")


def _processor_type(value: Any, where: str) -> Translation:
    if value in (None, "AutoProcessor"):
        return [], ""  # qlora uses the model folder's own processor, as AutoProcessor builds it
    raise UsageError(f"{where}: processor_type {value!r}: qlora uses the model folder's own processor "
                     "(AutoProcessor); set processor_type: AutoProcessor or remove the key.")


def _fsdp(value: Any, where: str) -> Translation:
    """Ours is true/false; axolotl's is a list of FSDP options (full_shard, auto_wrap): sharding either way."""
    return [("fsdp", bool(value) if isinstance(value, list) else value)], ""


def _special_tokens(value: Any, where: str) -> Translation:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: special_tokens is a mapping such as {{pad_token: ...}}.")
    kept = {k: v for k, v in value.items() if k != "pad_token" and v is not None}
    if not kept:
        return [], ""  # padding never enters the loss
    return [], (f"{where}: special_tokens {', '.join(kept)}: qlora keeps the tokenizer's own; axolotl replaces "
                "them only where they differ (checked when the model is a local folder)")


def _check_special_tokens(value: Any, model: Any, where: str) -> None:
    """axolotl's ``special_tokens`` (bos, eos, unk) must be the local model's own: qlora does not replace them."""
    config = Path(str(model or "")).expanduser() / "tokenizer_config.json"
    if not isinstance(value, dict) or not config.is_file():
        return
    try:
        own = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return  # the model load reports an unreadable tokenizer
    for key, token in value.items():
        theirs = own.get(key)
        theirs = theirs.get("content") if isinstance(theirs, dict) else theirs
        if key != "pad_token" and token is not None and token != theirs:
            raise UsageError(f"{where}: special_tokens {key} {token!r}: the model's tokenizer has {theirs!r}, and "
                             "qlora trains with the tokenizer's own special tokens; set "
                             f"{key} in {config} to change it, or remove the key.")


def _truncation_mode(value: Any, where: str) -> Translation:
    if value in (None, "keep_start"):
        return [], ""  # qlora cuts prompt + answer to seq_len keeping their start, as TRL's keep_start
    raise UsageError(f"{where}: truncation_mode {value!r}: qlora cuts prompt + answer to seq_len keeping their start "
                     "(TRL's keep_start); set truncation_mode: keep_start or remove the key.")


def _packing_strategy(value: Any, where: str) -> Translation:
    if value in (None, "bfd", "ffd"):
        return [], ""  # TRL's best-fit (ffd before 0.20) packing: whole examples, overflow cut, kept apart as ours
    raise UsageError(f"{where}: packing_strategy {value!r}: qlora packs whole examples, cut to max_length and kept "
                     "apart (TRL's bfd); bfd_split and wrapped split examples across rows. Set bfd or remove the key.")


def _best_metric(value: Any, where: str) -> Translation:
    if value in (None, "loss", "eval_loss"):
        return [], ""  # transformers' default: the eval loss, which qlora's plateau schedule follows
    raise UsageError(f"{where}: metric_for_best_model {value!r}: qlora evaluates the loss (and perplexity) on "
                     "held-out data only; set metric_for_best_model: eval_loss or remove the key.")


def _dataset_kwargs(value: Any, where: str) -> Translation:
    """TRL's ``dataset_kwargs``: ``add_special_tokens: false`` (the chat template writes BOS and EOS, as qlora
    writes chat rows) and ``append_concat_token: false`` (no EOS between packed rows' texts; qlora's packed
    examples each end as written) are what qlora does; other settings are refused by name."""
    if not isinstance(value, dict):
        raise UsageError(f"{where}: dataset_kwargs is a mapping (add_special_tokens, append_concat_token).")
    other = {k: v for k, v in value.items() if not (k in ("add_special_tokens", "append_concat_token") and v is False)}
    if other:
        raise UsageError(f"{where}: dataset_kwargs {other}: qlora writes chat rows with the template's own special "
                         "tokens and no extra ones (add_special_tokens: false, append_concat_token: false); remove "
                         "the others.")
    return [], ""


def _sample_packing_sequentially(value: Any, where: str) -> Translation:
    """axolotl's next-fit packing in its sampler's order (its default bins by first-fit decreasing): qlora packs
    next-fit in its order always (shuffled, or the data's under curriculum_sampling), each example kept apart either
    way; only which examples share a row differs (axolotl repacks each epoch, qlora packs once and shuffles rows)."""
    if not isinstance(value, bool):
        raise UsageError(f"{where}: sample_packing_sequentially expects true or false; got {value!r}.")
    return [], ""


def _dataset_text_field(value: Any, where: str) -> Translation:
    return ([("data_fields", f"text={value}")] if value not in (None, "text") else []), ""


# Attention backends that compute softmax(QK^T/sqrt(d))V exactly, as qlora's; axolotl's sage and fp8 quantize Q and K.
_EXACT_ATTENTION = frozenset({"eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "xformers"})


def _attn_implementation(value: Any, where: str) -> Translation:
    if value is None or isinstance(value, str) and value in _EXACT_ATTENTION:
        return [], ""
    raise UsageError(f"{where}: attn_implementation {value!r}: qlora computes attention exactly (as eager, sdpa and "
                     "flash attention do); a quantized or hub-kernel attention computes something else. Remove the "
                     "key, or set it to sdpa.")


# axolotl's plugins that change speed, memory or logging, not the loss: Cut Cross-Entropy (the same cross-entropy
# without materialized logits), Liger's and the hub's kernels (read with their own liger_*/use_* keys), SwanLab.
_RUNTIME_PLUGINS = frozenset({
    "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin", "axolotl.integrations.liger.LigerPlugin",
    "axolotl.integrations.kernels.KernelsPlugin", "axolotl.integrations.swanlab.SwanLabPlugin",
})


def _plugins(value: Any, where: str) -> Translation:
    listed = value if isinstance(value, list) else [value]
    other = [str(p) for p in listed if not (isinstance(p, str) and p in _RUNTIME_PLUGINS)]
    if other:
        raise UsageError(f"{where}: plugins {', '.join(other)}: an axolotl plugin qlora has no counterpart for (it "
                         "passes over the kernel and logging ones: CutCrossEntropyPlugin, LigerPlugin, KernelsPlugin, "
                         "SwanLabPlugin); remove it from the list.")
    return [], ""


def _other_command(key: str, what: str) -> Callable[[Any, str], Translation]:
    """A key of a LLaMA-Factory file that is not a training run: which qlora command does that instead."""
    def refuse(value: Any, where: str) -> Translation:
        raise UsageError(f"{where}: {key}: {what}")
    return refuse


_LLAMA_FACTORY_V1 = ("this is a LLaMA-Factory v1 file (model_class, peft_config, train_dataset), which qlora does "
                     "not read; write its settings as LLaMA-Factory's training files do (model_name_or_path, stage: "
                     "sft, finetuning_type: lora, lora_rank, lora_target: all, dataset, template, ...; see its "
                     "examples/train_lora), or give them as qlora train flags.")

TRANSLATED: dict[str, Callable[[Any, str], Translation]] = {
    "attn_implementation": _attn_implementation, "plugins": _plugins,
    "export_dir": _other_command("export_dir", "a LLaMA-Factory export (merge) file, not a training run; fold the "
                                               "adapter into its base with qlora merge --model BASE --adapter "
                                               "ADAPTER --output DIR (qlora export for GGUF)."),
    "infer_backend": _other_command("infer_backend", "a LLaMA-Factory inference file, not a training run; talk to the "
                                                     "model with qlora chat --model BASE --adapter ADAPTER (qlora "
                                                     "serve for an OpenAI API)."),
    "model_class": _other_command("model_class", _LLAMA_FACTORY_V1),
    "peft_config": _other_command("peft_config", _LLAMA_FACTORY_V1),
    "quantization_bit": _quantization_bit, "quantization_method": _quantization_method,
    "finetuning_type": _finetuning_type, "lora_target": _lora_target, "template": _template_of("LLaMA-Factory"),
    "chat_template": _template_of("axolotl"), "resume_from_checkpoint": _resume,
    "chat_template_path": lambda value, where: ([("template", own_value(value) if isinstance(value, str) else value)],
                                                ""),  # TRL's SFTConfig: a .jinja file, or a tokenizer folder
    "datasets": _datasets("data"), "test_datasets": _datasets("eval_data"), "rl": _rl, "fsdp": _fsdp,
    "special_tokens": _special_tokens, "dataset_text_field": _dataset_text_field, "truncation_mode": _truncation_mode,
    "packing_strategy": _packing_strategy, "dataset_kwargs": _dataset_kwargs,
    "sample_packing_sequentially": _sample_packing_sequentially,
    "sync_ref_model": _refused("sync_ref_model", "TR-DPO's reference that follows the policy: qlora's reference is "
                                                 "the frozen base (or --adapter's starting adapter), as TRL's with "
                                                 "PEFT, where TRL refuses sync_ref_model too; set it to false."),
    "router_aux_loss_coef": _refused("router_aux_loss_coef", "qlora adds no mixture-of-experts router loss to "
                                                             "the training loss; remove the key (or set it to 0)."),
    "load_in_8bit": _refused("load_in_8bit", "qlora stores the base model in 4 bits (load_in_4bit: true, adapter: "
                                             "qlora) or keeps it 16-bit (adapter: lora); set load_in_8bit: false."),
    "group_by_length": _refused("group_by_length", "qlora draws batches in a seeded random order, not grouped by "
                                                   "length; set it to false."),
    "early_stopping_patience": _refused("early_stopping_patience", "qlora trains the steps or epochs it is given; "
                                                                   "remove the key and choose max_steps or epochs."),
    "load_best_model_at_end": _refused("load_best_model_at_end", "qlora's result is the last step's adapter, not "
                                       "the best checkpoint's; set it to false, and take the checkpoint of the "
                                       "lowest eval loss in metrics.jsonl (save_strategy epoch or steps keep them)."),
    "metric_for_best_model": _best_metric,
    "greater_is_better": _refused("greater_is_better", "qlora's plateau schedule follows the eval loss, which is "
                                                       "better lower; remove the key."),
    "lora_fan_in_fan_out": _refused("lora_fan_in_fan_out", "qlora adapts torch.nn.Linear layers; remove the key."),
    "tokens": _refused("tokens", "qlora adds tokens as special tokens (add_special_tokens: [...], their embeddings "
                                 "and the output head trained whole); use that key."),
    "eos_token": _refused("eos_token", "qlora ends turns with the chat template's own end token; remove the key."),
    "ray_num_workers": _ray_num_workers, "do_train": _do_train, "adapter_name_or_path": _adapter_name_or_path,
    "do_predict": _refused("do_predict", "LLaMA-Factory's prediction run (answers generated for eval_dataset, "
                                         "scored with BLEU/ROUGE); qlora train does not predict. Remove the key, "
                                         "and generate with qlora generate --adapter OUTPUT after training."),
    "freeze_vision_tower": _frozen("freeze_vision_tower", True, "qlora keeps the vision tower frozen (16-bit, "
                                                                 "no LoRA on it), as LLaMA-Factory's default; set "
                                                                 "it to true or remove it."),
    "freeze_multi_modal_projector": _frozen("freeze_multi_modal_projector", True, "qlora keeps the multimodal "
                                                                                   "projector frozen (16-bit, no "
                                                                                   "LoRA on it); set it to true or "
                                                                                   "remove it."),
    "freeze_language_model": _frozen("freeze_language_model", False, "qlora trains LoRA adapters on the language "
                                                                      "model (the vision tower and projector stay "
                                                                      "frozen); set it to false or remove it."),
    "image_do_pan_and_scan": _refused("image_do_pan_and_scan", "Gemma 3's pan and scan (extra crops of each image), "
                                                               "which qlora does not ask of the processor; set it "
                                                               "to false or remove it."),
    "crop_to_patches": _refused("crop_to_patches", "InternVL's tiling of each image into crops, which qlora does not "
                                                   "ask of the processor; set it to false or remove it."),
    "image_size": _refused("image_size", "axolotl resizes every image to that size (a number: a padded square) "
                                         "before the processor; qlora gives the processor each image as stored, or "
                                         "bounded by image_max_pixels/image_min_pixels (LLaMA-Factory's). Remove "
                                         "the key, or bound the pixels instead."),
    "image_resize_algorithm": _refused("image_resize_algorithm", "axolotl's filter for its image_size resize, "
                                                                 "which qlora does not do; remove the key."),
    "processor_type": _processor_type, "save_on_each_node": _save_on_each_node,
    **{key: _other_optimizer(key) for key in _OTHER_OPTIMIZERS},
    "module_dropout": _refused("module_dropout", "the dropout of PEFT's LoHa, LoKr and OFT adapters (a whole "
                                                 "adapter skipped at random); qlora trains LoRA, whose dropout is "
                                                 "lora_dropout (dropout). Remove the key or set it to 0."),
    "mask_history": _refused("mask_history", "LLaMA-Factory then trains on the last answer of each conversation "
                                             "only; qlora trains on every assistant turn (train_on: assistant) or on "
                                             "all tokens (train_on: all). Remove the key, or keep only each "
                                             "conversation's last answer."),
}

# axolotl's defaults where they differ from qlora's (ours follow the QLoRA paper): its schema's cosine schedule,
# torch's fused AdamW, no LoRA dropout, and transformers' max_grad_norm 1.0 and no warmup.
AXOLOTL_DEFAULTS = {"lr_scheduler": "cosine", "optim": "adamw", "dropout": 0.0, "max_grad_norm": 1.0,
                    "warmup_ratio": 0.0, "save_strategy": "epoch",  # each epoch's checkpoint, unless told otherwise
                    "save_total_limit": 4}  # of which its trainer builder keeps the last 4


def silent_defaults(values: dict[str, Any], defaults: dict[str, Any], path: Path, tool: str) -> None:
    """``defaults`` (another tool's, where they differ from qlora's) for the options ``values`` leaves unset, as
    that tool would train the file (``tool``, with its article, names it in the note); an explicit warmup_steps
    keeps its own warmup, an explicit save_steps (saves_per_epoch) its own checkpoints."""
    unset = {k: v for k, v in defaults.items() if k not in values}
    for given, default in (("warmup_steps", "warmup_ratio"), ("save_steps", "save_strategy")):
        if given in values:
            unset.pop(default, None)
    if unset:
        values.update(unset)
        print(f"qlora train: {path} is {tool} config: its defaults apply where it is silent "
              f"({', '.join(f'{k} {v}' for k, v in unset.items())})", file=sys.stderr)


def is_axolotl(loaded: dict) -> bool:
    """Whether a config file is axolotl's: its ``adapter: lora|qlora`` or its ``datasets:`` list."""
    return loaded.get("adapter") in ("lora", "qlora") or isinstance(loaded.get("datasets"), list)


def jinja_template_keys(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """axolotl's ``chat_template: jinja`` with ``chat_template_jinja`` (the template's text, or a file of it) read
    together as the template to train with; ``chat_template`` may be left out, as it says nothing more then. A
    dataset's own (:func:`dataset_template_keys`) is the run's when it is every chat dataset's."""
    loaded = dataset_template_keys(loaded, lines, path)
    jinja = loaded.get("chat_template_jinja")
    if jinja is None:
        return loaded
    where = f"{path} line {lines.get('chat_template_jinja', '?')}"
    if not isinstance(jinja, str) or not jinja.strip():
        raise UsageError(f"{where}: chat_template_jinja is a Jinja chat template's text or the path of a .jinja "
                         f"file; got {jinja!r}.")
    chosen = loaded.get("chat_template")
    if chosen not in (None, "jinja"):
        raise UsageError(f"{where}: chat_template_jinja with chat_template {chosen!r}: axolotl uses "
                         "chat_template_jinja only with chat_template: jinja; keep one.")
    out = {k: v for k, v in loaded.items() if k not in ("chat_template", "chat_template_jinja")}
    out["chat_template"] = own_value(jinja)
    lines["chat_template"] = lines.get("chat_template_jinja", 0)
    return out


_TEMPLATE_KEYS = ("chat_template", "chat_template_jinja")


def dataset_template_keys(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """axolotl's ``chat_template`` and ``chat_template_jinja`` inside ``datasets:`` (and ``test_datasets:``)
    entries, taken out of them: axolotl renders a dataset with its own template when it names one
    (``extract_chat_template_args``; ``chat_template_jinja`` alone implies ``chat_template: jinja``), else with the
    config's. qlora trains with one template, so the entries' is the run's when every chat dataset (``chat_template``
    and ``sharegpt`` types) renders with the same one.

    Raises:
        UsageError: chat datasets that axolotl renders with different templates, or an entry's ``chat_template:
            jinja`` without its text (or its text beside another template name), naming the line and entry.
    """
    top = (loaded.get("chat_template"), loaded.get("chat_template_jinja"))
    top = ("jinja", top[1]) if top[1] and top[0] is None else top
    chosen: list[tuple[str, tuple]] = []  # (where, (choice, jinja)) of each chat dataset
    out, own = dict(loaded), False
    for key in ("datasets", "test_datasets"):
        entries = loaded.get(key)
        if not isinstance(entries, list):
            continue
        out[key] = []
        for k, entry in enumerate(entries):
            where = f"{path} line {lines.get(key, '?')}, {key} item {k + 1}"
            if not isinstance(entry, dict):
                out[key].append(entry)
                continue
            choice, jinja = entry.get("chat_template"), entry.get("chat_template_jinja")
            out[key].append({n: v for n, v in entry.items() if n not in _TEMPLATE_KEYS})
            if jinja is not None and choice in (None, "jinja"):
                if not isinstance(jinja, str) or not jinja.strip():
                    raise UsageError(f"{where}: chat_template_jinja is a Jinja chat template's text or the path of a "
                                     f".jinja file; got {jinja!r}.")
                choice = "jinja"
            elif choice == "jinja":
                raise UsageError(f"{where}: chat_template jinja takes its template from the dataset's "
                                 "chat_template_jinja (the template's text or a .jinja file); add it.")
            elif jinja is not None and choice is not None:
                raise UsageError(f"{where}: chat_template_jinja with chat_template {choice!r}: axolotl uses "
                                 "chat_template_jinja only with chat_template: jinja; keep one.")
            kind = str(entry.get("type", ""))
            if choice is not None:
                own = True
                chosen.append((where, (choice, jinja if choice == "jinja" else None)))
            elif kind.startswith(("chat_template", "sharegpt", "orpo.chat_template")):
                chosen.append((where, top))
    if not own:
        return loaded
    first = chosen[0][1]
    for where, template in chosen:
        if template != first:
            said = "the config's chat template" if template == top else f"chat_template {template[0]!r}"
            raise UsageError(f"{where}: this dataset renders with {said} (or the model's when none is given), another "
                             f"with chat_template {first[0]!r}: qlora trains with one chat template. Give every chat "
                             "dataset the same one, or set it once at the top level (chat_template, "
                             "chat_template_jinja).")
    out = {k: v for k, v in out.items() if k not in _TEMPLATE_KEYS}
    out["chat_template"] = first[0]
    lines["chat_template"] = lines.get("datasets", lines.get("test_datasets", 0))
    if first[1] is not None:
        out["chat_template_jinja"] = first[1]
        lines["chat_template_jinja"] = lines["chat_template"]
    return out


def adapter_keys(loaded: dict, lines: dict[str, int], path: Path) -> dict:
    """The keys that say what is trained on which base, read together: axolotl's ``adapter`` (qlora, lora) and
    ``load_in_4bit``, TRL's ``use_peft``, ``load_in_4bit`` and ``use_bnb_nested_quant``; axolotl's
    ``lora_target_linear`` with ``lora_target_modules``, ``lora_modules_to_save``, ``special_tokens`` and
    ``orpo_alpha``; its ``datasets`` (and ``test_datasets``) with ``rl``, which decides what their types mean;
    its ``saves_per_epoch``/``evals_per_epoch`` with ``num_epochs``, as shares of the run's steps.

    ``adapter: qlora`` (or ``use_peft``) with ``load_in_4bit: true`` is qlora's NF4 base (bitsandbytes' NF4, as
    both ask it; TRL's without double quantization unless ``use_bnb_nested_quant``), ``adapter: lora`` (or
    ``use_peft``) without it a 16-bit base (quant: none); an ``adapter`` that is a folder stays ours (the
    adapter to train further). An axolotl 4-bit base silent on ``quantize_moe_experts`` keeps a MoE's 3-D expert
    weights 16-bit, as axolotl does (its default false: bitsandbytes quantizes linear layers only): the base it
    trains on, at the memory it takes there."""
    adapter = loaded.get("adapter")
    axolotl_key = adapter in ("lora", "qlora")
    peft = axolotl_key or loaded.get("use_peft") is True
    consumed = {"load_in_4bit", "use_peft"} | ({"adapter"} if axolotl_key else set())
    out = {k: v for k, v in loaded.items() if k not in consumed}
    where = {k: f"{path} line {lines.get(k, '?')}" for k in loaded}
    four = loaded.get("load_in_4bit")
    if four not in (None, True, False):
        raise UsageError(f"{where['load_in_4bit']}: load_in_4bit expects true or false; got {four!r}.")
    if loaded.get("use_peft") is False:
        raise UsageError(f"{where['use_peft']}: use_peft: false is full fine-tuning; qlora trains LoRA adapters on a "
                         "frozen base: set use_peft: true.")
    if adapter == "qlora" and not four:
        raise UsageError(f"{where['adapter']}: adapter: qlora trains on a 4-bit base; set load_in_4bit: true (as "
                         "axolotl requires), or adapter: lora for a 16-bit base.")
    if four and not peft:
        raise UsageError(f"{where['load_in_4bit']}: load_in_4bit without adapter: qlora (axolotl) or use_peft: true "
                         "(TRL) is full fine-tuning; qlora trains LoRA adapters: add adapter: qlora or use_peft: true.")
    base = "adapter" if axolotl_key else "use_peft"
    if peft and not four:
        if "quant" in out:
            raise UsageError(f"{where[base]}: {base} without load_in_4bit (a 16-bit base) and quant both set the "
                             "base's format; keep one.")
        out["quant"] = "none"
        lines.setdefault("quant", lines.get(base, 0))
    if four and not axolotl_key and not {"double_quant", "bnb_4bit_use_double_quant", "use_bnb_nested_quant"} & set(
            loaded):
        out["double_quant"] = False  # TRL's ModelConfig: use_bnb_nested_quant defaults to false
        lines.setdefault("double_quant", lines.get("load_in_4bit", 0))
    if loaded.get("lora_target_linear") and loaded.get("lora_target_modules"):
        listed = loaded["lora_target_modules"]
        listed = listed.split(",") if isinstance(listed, str) else list(listed)
        outside = [m for m in listed if str(m).strip() in ("lm_head", "embed_tokens")]
        if outside:
            raise UsageError(f"{where['lora_target_modules']}: {', '.join(outside)} with lora_target_linear: true: "
                             "qlora's all-linear leaves the output head and embeddings out, as PEFT's does; list "
                             "the layers in lora_target_modules without lora_target_linear.")
        del out["lora_target_modules"]  # every linear layer is adapted already (axolotl takes the union)
    to_save = [m for m in (loaded.get("lora_modules_to_save") or [])]
    out.pop("lora_modules_to_save", None)
    if to_save and not (set(to_save) <= {"embed_tokens", "lm_head"} and loaded.get("add_special_tokens")):
        raise UsageError(f"{where['lora_modules_to_save']}: lora_modules_to_save {to_save}: qlora trains the "
                         "embeddings and output head whole when add_special_tokens adds tokens, and no other "
                         "modules; remove the key (or add tokens with add_special_tokens).")
    if loaded.get("special_tokens"):
        model = next((loaded[k] for k in ("base_model", "model", "model_name_or_path") if loaded.get(k)), None)
        _check_special_tokens(loaded["special_tokens"], model, where["special_tokens"])
    for per_epoch, option in (("saves_per_epoch", "save_steps"), ("evals_per_epoch", "eval_steps")):
        _per_epoch(loaded, out, lines, where, per_epoch, option)
    if is_axolotl(loaded) and loaded.get("batch_size") is not None:
        _total_batch(loaded, out, lines, where)
    _pissa_keys(loaded, out, lines, where)
    _relora(loaded, out, where)
    rl = loaded.get("rl")
    if rl in (None, False) or rl in _RL:  # an rl qlora lacks is refused by name when translated
        method = _RL[rl][0] if rl else str(loaded.get("method") or "sft")
        for key in ("datasets", "test_datasets"):
            if loaded.get(key) is not None:  # checked here, so that errors name the config's line
                axolotl_datasets(loaded[key], where[key], method)
    _float16(loaded, out, lines, where)
    if is_axolotl(loaded) and loaded.get("val_set_size"):  # its rows: the last of its seeded shuffle
        out["eval_split_order"] = "axolotl"
        lines["eval_split_order"] = lines.get("val_set_size", 0)
    _bfloat16(loaded, out, lines, where)
    if is_axolotl(loaded) and four and loaded.get("quantize_moe_experts") is None and "quantize_experts" not in out:
        out["quantize_experts"] = False  # axolotl's default: bitsandbytes quantizes linear layers only
        lines.setdefault("quantize_experts", lines.get("load_in_4bit", 0))
    if loaded.get("orpo_alpha") is not None and loaded.get("rl") != "orpo":
        raise UsageError(f"{where['orpo_alpha']}: orpo_alpha is ORPO's weight; this config is rl: "
                         f"{loaded.get('rl')}. Remove it, or set rl: orpo.")
    return out


def _bfloat16(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """axolotl's ``bfloat16: true`` (its schema: bf16 without AMP) sets what ``bf16: true`` sets, whatever ``bf16``
    says: the model's dtype (``bf16 or bfloat16``) and TrainingArguments' ``bf16 = cfg.bf16 or cfg.bfloat16``;
    qlora's precision bf16."""
    value = out.pop("bfloat16", None)
    if value not in (None, True, False):
        raise UsageError(f"{where['bfloat16']}: bfloat16 expects true or false; got {value!r}.")
    if value and out.get("bf16") is not True:
        out["bf16"] = True
        lines["bf16"] = lines.get("bfloat16", 0)


def _float16(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """axolotl's ``float16: true`` (its schema: fp16 without AMP) loads the model in float16 where neither ``bf16``
    nor ``bfloat16`` is on (``resolve_dtype``): qlora's precision fp16 beside ``bf16: false``; beside ``bf16: auto``
    (its default) axolotl takes bf16 where the GPU has it and float16 elsewhere, which is qlora's auto."""
    value = out.pop("float16", None)
    if value not in (None, True, False):
        raise UsageError(f"{where['float16']}: float16 expects true or false; got {value!r}.")
    if value and loaded.get("bf16") is False and not loaded.get("bfloat16") and out.get("fp16") is not True:
        out["fp16"] = True  # also beside fp16: false (``cfg.fp16 or cfg.float16``)
        lines["fp16"] = lines.get("float16", 0)


def _total_batch(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """axolotl's ``batch_size`` is the batch of one optimizer step on each GPU, not qlora's micro-batch: it sets
    the accumulation as axolotl derives it, ``batch_size // micro_batch_size`` (``micro_batch_size`` 1 when
    silent), and axolotl refuses it beside ``gradient_accumulation_steps``."""
    total, micro = loaded["batch_size"], loaded.get("micro_batch_size") or 1
    if loaded.get("gradient_accumulation_steps"):
        raise UsageError(f"{where['batch_size']}: batch_size with gradient_accumulation_steps: in an axolotl config "
                         "batch_size is micro_batch_size x gradient_accumulation_steps, and axolotl refuses both; "
                         "keep one.")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (total, micro)) or total < micro:
        raise UsageError(f"{where['batch_size']}: batch_size {total!r}: in an axolotl config it is the batch of one "
                         f"optimizer step (micro_batch_size {micro!r} x gradient_accumulation_steps), a whole number "
                         "at least micro_batch_size.")
    del out["batch_size"]
    out["gradient_accumulation_steps"] = total // micro
    lines.setdefault("gradient_accumulation_steps", lines.get("batch_size", 0))
    if total % micro:
        print(f"qlora train: {where['batch_size']}: batch_size {total} is not a multiple of micro_batch_size {micro}: "
              f"accumulating {total // micro} micro-batches ({total // micro * micro} examples a step), as axolotl "
              "does.", file=sys.stderr)


def _pissa_keys(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str]) -> None:
    """LLaMA-Factory's ``pissa_init`` with ``pissa_iter`` (its default 16; -1: the full SVD) as ``init``
    ``pissa_niter_<iter>`` or ``pissa``, as it passes them to PEFT. ``pissa_convert`` asks for the adapter converted
    to plain LoRA at the end, which qlora always writes (the form that loads on the original model); with
    ``pissa_convert: false`` it is written converted all the same, and the run says so. A 4-bit base, which
    LLaMA-Factory sends to its pissa_init.py script, takes the 16-bit SVD and quantizes the residual (QPiSSA)."""
    for key in ("pissa_init", "pissa_iter", "pissa_convert"):
        out.pop(key, None)
    for key in ("pissa_init", "pissa_convert"):
        if loaded.get(key) not in (None, True, False):
            raise UsageError(f"{where[key]}: {key} expects true or false; got {loaded[key]!r}.")
    if not loaded.get("pissa_init"):
        return
    steps = loaded.get("pissa_iter", 16)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < -1:
        raise UsageError(f"{where.get('pissa_iter', where['pissa_init'])}: pissa_iter expects -1 (the full SVD) or "
                         f"the randomized SVD's subspace iterations (0 or more); got {steps!r}.")
    if "init" in out:
        raise UsageError(f"{where['pissa_init']}: pissa_init and init both set the adapter's initialization; keep one.")
    out["init"] = "pissa" if steps == -1 else f"pissa_niter_{steps}"
    lines.setdefault("init", lines.get("pissa_init", 0))
    if loaded.get("pissa_convert") is False:
        print(f"qlora train: {where['pissa_convert']}: pissa_convert false: qlora writes the PiSSA adapter converted "
              "to rank-2r LoRA on the original model all the same (the adapter as trained is valid only on the "
              "residual base, which is not saved)", file=sys.stderr)


def _relora(loaded: dict, out: dict, where: dict[str, str]) -> None:
    """axolotl's ReLoRA (``relora: true``, or ``relora_steps`` in its older files): every ``relora_steps`` the
    adapter is merged into the base and restarted, which qlora does not do (a 4-bit base would be quantized again
    at each merge). Refused by name; its ``relora_*`` settings are read with it and pass without it."""
    keys = [k for k in loaded if str(k) == "relora" or str(k).startswith("relora_")]
    for key in keys:
        out.pop(key, None)
    on = loaded.get("relora") if "relora" in loaded else loaded.get("relora_steps")
    if on:
        key = "relora" if "relora" in loaded else "relora_steps"
        raise UsageError(f"{where[key]}: {key} {_shown(on)}: ReLoRA merges the adapter into the base every "
                         "relora_steps and starts a new one, which qlora does not do. Train one adapter (remove "
                         "the relora keys), or run in stages: train, qlora merge, then train a new adapter on the "
                         "merged model.")


def _shown(value: Any) -> str:
    """A YAML value as the file spells it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _per_epoch(loaded: dict, out: dict, lines: dict[str, int], where: dict[str, str], key: str, option: str) -> None:
    """axolotl's ``saves_per_epoch``/``evals_per_epoch`` as it computes them: a share of the run's steps,
    ``1 / (per_epoch * num_epochs)`` (num_epochs 1 unless set), which transformers rounds up to steps; a share of
    1 or more is the end of the run only (axolotl's save per epoch is then the last step, which qlora always
    checkpoints), and evaluations need ``val_set_size`` or ``test_datasets``."""
    out.pop(key, None)
    count = loaded.get(key)
    if not count:
        return
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise UsageError(f"{where[key]}: {key} expects a whole number; got {count!r}.")
    if loaded.get(option):
        raise UsageError(f"{where[key]}: {key} and {option} both set the {option.split('_')[0]} cadence (axolotl "
                         "refuses them together); keep one.")
    epochs = loaded.get("num_epochs") or loaded.get("num_train_epochs") or 1
    share = 1.0 / (count * epochs)
    if share < 1 and (option == "save_steps" or loaded.get("val_set_size") or loaded.get("test_datasets")):
        out[option] = share
        lines.setdefault(option, lines.get(key, 0))


def changes_nothing(key: str) -> bool:
    """Whether ``key`` is a setting of the other tool's runtime (or of videos and audio)."""
    return key in RUNTIME_ONLY or key in VIDEO_AUDIO or key.startswith(RUNTIME_PREFIXES)


def translate(key: str, value: Any, where: str) -> Translation | None:
    """Our ``(option, value)`` pairs for another tool's ``key`` (none for a key that changes nothing
    here) and a note for the user, or None for a key this module does not handle.

    Raises:
        UsageError: a value qlora has no equivalent for.
    """
    if key in TRANSLATED:
        return TRANSLATED[key](value, where)
    if changes_nothing(key):
        return [], ""
    return None
