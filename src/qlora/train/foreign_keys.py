"""Keys of other tools' YAML files whose values need translating, or that change nothing here.

Users bring their LLaMA-Factory, transformers ``TrainingArguments``, TRL and axolotl
configs. Keys that only rename one of ours are plain aliases
(:data:`qlora.train.config.ALIASES`); this module handles the rest:

- keys whose *values* differ: LLaMA-Factory's ``quantization_bit: 4``, ``finetuning_type: lora``,
  ``lora_target: all``, its template names (its ``stage`` and ``pref_loss``, which decide the
  method together, are read by :func:`qlora.train.config.load_config`);
- settings of the other tool's runtime that do not change what a run computes
  (worker counts, caches, timeouts, report sinks): passed over, and the run says which;
- values qlora has no equivalent for (8-bit quantization, full fine-tuning, PPO, Ray, multimodal
  training): refused by name, instead of training something else than the file asks.
"""

from __future__ import annotations

from typing import Any, Callable

from qlora.errors import UsageError
from qlora.train.data.templates import TEMPLATES

Translation = tuple[list[tuple[str, Any]], str]  # our (option, value) pairs, and a note for the user ("" if none)

# Settings of the other tool's runtime: they change speed, logging or caching, never the result.
RUNTIME_ONLY = frozenset({
    "do_eval", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "ddp_timeout", "ddp_find_unused_parameters",
    "plot_loss", "report_to", "logging_dir", "run_name", "save_only_model", "trust_remote_code", "flash_attn",
    "disable_tqdm", "use_fast_tokenizer", "tokenized_path", "per_device_eval_batch_size", "eval_batch_size",
    "include_num_input_tokens_seen", "remove_unused_columns", "logging_first_step", "save_safetensors",
    "quantization_device_map", "low_cpu_mem_usage", "wandb_project", "wandb_entity", "wandb_run_id",
    "wandb_name", "wandb_watch", "wandb_log_model", "bnb_4bit_quant_storage", "eval_strategy",
    "evaluation_strategy", "save_strategy", "logging_strategy", "enable_liger_kernel", "use_unsloth",
    "use_unsloth_gc", "print_param_status", "deepspeed", "use_v1_kernels", "pissa_iter", "pissa_convert",
})
# LLaMA-Factory's settings of multimodal models and their media (qlora fine-tunes text-only language models).
MULTIMODAL = frozenset({
    "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
    "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate", "media_dir",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model",
})


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


# LLaMA-Factory's template names with a built-in equivalent; its others name a model family's own format.
_TEMPLATE_NAMES = {"llama3": "llama-3", "chatml": "chatml", "alpaca": "alpaca"}


def _template(value: Any, where: str) -> Translation:
    if not isinstance(value, str) or value in ("auto", "tokenizer") or value in TEMPLATES:
        return [("template", value)], ""
    if value in _TEMPLATE_NAMES:
        return [("template", _TEMPLATE_NAMES[value])], ""
    return [("template", "auto")], (f"{where}: template {value!r} is a LLaMA-Factory name; training with the "
                                    "model's own chat template (template: auto), the format that template writes "
                                    "for its model family")


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


def _do_predict(value: Any, where: str) -> Translation:
    if value:
        raise UsageError(f"{where}: do_predict true: LLaMA-Factory's prediction run (answers generated for "
                         "eval_dataset, scored with BLEU/ROUGE); qlora train does not predict. Remove the key, and "
                         "generate with qlora generate --adapter OUTPUT after training.")
    return [], ""


def _adapter_name_or_path(value: Any, where: str) -> Translation:
    if isinstance(value, str) and "," in value:
        raise UsageError(f"{where}: adapter_name_or_path {value!r}: several adapters, which LLaMA-Factory merges "
                         "into the base but the last; qlora continues one adapter. Merge the others first (qlora "
                         "merge) and give the merged model as model_name_or_path.")
    return [("adapter", value)], ""


def _pissa_init(value: Any, where: str) -> Translation:
    if value:
        raise UsageError(f"{where}: pissa_init true: qlora has no PiSSA initialization (init: kaiming, gaussian or "
                         "loftq); remove the PiSSA keys, or set init: loftq for an initialization that also "
                         "accounts for the 4-bit base.")
    return [], ""


def _mask_history(value: Any, where: str) -> Translation:
    if value:
        raise UsageError(f"{where}: mask_history true: LLaMA-Factory then trains on the last answer of each "
                         "conversation only; qlora trains on every assistant turn (train_on: assistant) or on all "
                         "tokens (train_on: all). Remove the key, or keep only each conversation's last answer.")
    return [], ""


def _ray_num_workers(value: Any, where: str) -> Translation:
    raise UsageError(f"{where}: ray_num_workers {value!r}: LLaMA-Factory's Ray launcher; qlora runs on several GPUs "
                     f"under torchrun (qlora train --nproc {value} ...), where the global batch is, as with Ray, "
                     "the batch per GPU times the GPUs times gradient_accumulation_steps. Remove the key and give "
                     "--nproc instead.")


TRANSLATED: dict[str, Callable[[Any, str], Translation]] = {
    "quantization_bit": _quantization_bit, "quantization_method": _quantization_method,
    "finetuning_type": _finetuning_type, "lora_target": _lora_target, "template": _template,
    "resume_from_checkpoint": _resume, "ray_num_workers": _ray_num_workers, "do_train": _do_train,
    "do_predict": _do_predict, "adapter_name_or_path": _adapter_name_or_path, "pissa_init": _pissa_init,
    "mask_history": _mask_history,
}

def translate(key: str, value: Any, where: str) -> Translation | None:
    """Our ``(option, value)`` pairs for another tool's ``key`` (none for a key that changes nothing
    here) and a note for the user, or None for a key this module does not handle.

    Raises:
        UsageError: a value qlora has no equivalent for.
    """
    if key in RUNTIME_ONLY:
        return [], ""
    if key in MULTIMODAL:
        raise UsageError(f"{where}: {key} is a setting of LLaMA-Factory's multimodal training (images, videos, "
                         "audio); qlora fine-tunes text-only language models on text. Remove the multimodal keys "
                         "and datasets, or use another tool for vision or audio models.")
    if key in TRANSLATED:
        return TRANSLATED[key](value, where)
    return None
