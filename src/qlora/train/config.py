"""The training configuration: one typed dataclass, the single source of truth.

Every field carries its help text in ``metadata["help"]``; the ``qlora train``
flags, the YAML keys and the resolved ``config.yaml`` of a run are all derived
from :class:`TrainConfig`, so they cannot drift apart. Defaults follow the
QLoRA paper (NF4, double quantization, paged AdamW, lr 2e-4, max grad norm 0.3,
warmup ratio 0.03, LoRA dropout 0.05) with a smaller default rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from qlora.errors import UsageError
from qlora.model.chat_format import pinned_datetime
from qlora.model.image_pixels import RESIZE_RULES, PixelBounds
from qlora.model.local_path import check_adapter_path, check_model_path
from qlora.nn.residual_init_names import is_residual_init
from qlora.option_range import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range
from qlora.optim.lr_schedules import PLATEAU, SCHEDULE_ALIASES, SCHEDULES, check_schedule, schedule_name
from qlora.optimizer_names import OPTIMIZER_ALIASES, OPTIMIZER_NAMES, optimizer_name
from qlora.quant import BLOCKSIZES
from qlora.template_file import is_custom, is_inline, read_template, template_digest
from qlora.template_names import template_name
from qlora.train.data.fields import parse_data_fields
from qlora.train.data.sources import LOCAL_SUFFIXES
from qlora.train.file_fingerprint import Fingerprint, data_fingerprints, model_fingerprints
from qlora.train.foreign_keys import (AXOLOTL_DEFAULTS, READ_WITH_DEFAULTS, adapter_keys, is_axolotl,
                                      jinja_template_keys, silent_defaults, translate)
from qlora.train.peft_keys import peft_option_keys
from qlora.train.strategy import LOGGING_STRATEGIES, STRATEGIES
from qlora.train.torchtune_config import is_torchtune, torchtune_options
from qlora.train.trl_config import is_trl, loss_keys, preference_keys, trl_defaults, trl_options
from qlora.train.f_divergences import F_DIVERGENCE_LOSSES, F_DIVERGENCES

QUANTS = ("nf4", "fp4", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
INITS = ("kaiming", "gaussian", "loftq", "pissa", "olora")  # and pissa_niter_K
METHODS = ("sft", "dpo", "orpo", "cpo", "simpo", "kto")
# TRL 1.16's DPOTrainer loss types ("sft": the NLL of the chosen answers, RPO) and those that read --label-smoothing.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
DPO_SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "sft")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")  # TRL 1.16's CPOTrainer; simpo is --method simpo's
KTO_LOSSES = ("kto", "apo_zero_unpaired")  # TRL 1.16's KTOTrainer
# Preference options and the methods they apply to (any other method refuses them by name).
_METHOD_OPTIONS = {
    "label_smoothing": ("dpo", "cpo", "simpo"), "precompute_ref": ("dpo", "kto"), "loss_type": ("dpo", "cpo", "kto"),
    "loss_weights": ("dpo",), "rpo_alpha": ("dpo",), "discopop_tau": ("dpo",), "cpo_alpha": ("cpo", "simpo"),
    "simpo_gamma": ("cpo", "simpo"), "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
    "ld_alpha": ("dpo",), "wpo": ("dpo",), "f_divergence_type": ("dpo",), "f_alpha_divergence_coef": ("dpo",),
    "alphapo_alpha": ("cpo", "simpo"),
}

# Fields whose change makes a checkpoint incompatible with a resumed run.
_RUN_DEFINING = (
    "model", "adapter", "data", "dataset_dir", "media_dir", "image_max_pixels", "image_min_pixels", "image_resize", "data_split", "data_subset", "quant", "double_quant", "blocksize", "rank", "alpha", "dropout", "target_modules",
    "quantize_experts",
    "target_parameters",
    "rslora", "rank_pattern", "alpha_pattern", "lora_bias", "bias", "dora", "init", "loftq_iter", "seq_len", "batch_size", "grad_accum", "lr", "lr_scheduler",
    "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
    "epochs", "max_steps", "max_steps_per_epoch", "optim", "max_samples", "eval_split", "lora_plus_ratio", "neftune_alpha",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "packing", "shuffle", "dedupe",
    "group_texts",
    "group_shards", "template", "format",
    "data_fields",
    "system_into_user",
    "train_on", "seed", "precision", "chunked_ce", "add_special_tokens", "eot_tokens",
    "adalora", "adalora_init_r", "adalora_target_r",
    "adalora_tinit", "adalora_tfinal", "adalora_delta_t",
)


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, range: Range | None = None) -> Any:
    """A field with its help text, its allowed values or its allowed numeric range (checked by ``validate``)."""
    return field(default=default, metadata={"help": help, "choices": choices, "range": range})


@dataclass
class TrainConfig:
    """All options of a training run (YAML key == flag name with ``-`` for ``_``)."""

    model: str | None = _opt(None, "base model: a local transformers folder or a hub id")
    method: str = _opt("sft", "training objective: sft (next-token loss on --data examples), or, on preference "
                              "pairs {prompt, chosen, rejected}: dpo (against a reference model), orpo, cpo or simpo "
                              "(reference-free; TRL's CPOTrainer, simpo = its loss simpo without NLL), or kto on "
                              "unpaired rows {prompt, completion, label: true/false} (or pairs, unpaired)", METHODS)
    beta: float = _opt(0.1, "dpo, kto: strength of the pull towards the reference (beta of the loss; IPO's tau); "
                            "cpo, simpo: temperature beta of the loss; orpo: weight lambda of the odds-ratio term",
                       range=POSITIVE)
    label_smoothing: float = _opt(0.0, "dpo (sigmoid, robust, aot, aot_unpaired), cpo (sigmoid), simpo: probability "
                                       "that a preference label is wrong (conservative DPO); dpo exo_pair: its epsilon",
                                  range=Range(0, 0.5, high_open=True))
    loss_type: str = _opt("", "dpo: TRL's loss_type (default: sigmoid): sigmoid, hinge, ipo, robust, exo_pair, "
                              "nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, "
                              "sigmoid_norm or sft (NLL of the chosen answers); several as a,b (a YAML list) are added, "
                              "weighted by --loss-weights; cpo (default: sigmoid): sigmoid, hinge, ipo or simpo; kto "
                              "(default: kto): kto or apo_zero_unpaired")
    loss_weights: str = _opt("", "dpo: weights of the --loss-type list, as 1,0.5 (a YAML list; default: 1 each)")
    rpo_alpha: float = _opt(0.0, "dpo: RPO: add this times the NLL of the chosen answers (the mean over their "
                                 "tokens; TRL's rpo_alpha, its loss type sft)", range=NON_NEGATIVE)
    discopop_tau: float = _opt(0.05, "dpo --loss-type discopop: temperature tau of its log-ratio modulation",
                               range=POSITIVE)
    ld_alpha: float | None = _opt(None, "dpo: LD-DPO (TRL's ld_alpha): the tokens of an answer past the length of "
                                        "the shorter answer of its pair count by this weight in its log-probs, "
                                        "the policy's and the reference's (1: plain DPO; 0: cut off)",
                                  range=Range(0, 1))
    wpo: bool = _opt(False, "dpo: WPO (TRL's use_weighting): weigh each pair's loss by the policy's per-token "
                            "probabilities of its two answers, relative to its own sampling (detached)")
    f_divergence_type: str = _opt("reverse_kl", "dpo: f-DPO: the divergence to the reference that the loss "
                                                "regularizes (reverse_kl is DPO's); loss types sigmoid, "
                                                "sigmoid_norm, hinge, ipo, exo_pair, robust, discopop and sft",
                                  F_DIVERGENCES)
    f_alpha_divergence_coef: float = _opt(0.5, "dpo --f-divergence-type alpha_divergence: its alpha (1 is "
                                               "reverse_kl, 0 forward_kl)", range=Range())
    alphapo_alpha: float = _opt(0.0, "cpo, simpo: AlphaPO (TRL CPOConfig's alpha): rewards (1 - p^-alpha) / alpha "
                                     "of the answers' probabilities p instead of log p (0: log p)", range=Range())
    cpo_alpha: float | None = _opt(None, "cpo, simpo: weight of the NLL of the chosen answers (TRL's cpo_alpha; "
                                         "default: 1 for cpo, 0 for simpo; > 0 with simpo is CPO-SimPO)",
                                   range=NON_NEGATIVE)
    simpo_gamma: float = _opt(0.5, "simpo (cpo --loss-type simpo): target reward margin gamma", range=NON_NEGATIVE)
    desirable_weight: float = _opt(1.0, "kto: weight of the losses of desirable (label true) completions",
                                   range=POSITIVE)
    undesirable_weight: float = _opt(1.0, "kto: weight of the losses of undesirable (label false) completions",
                                     range=POSITIVE)
    precompute_ref: bool = _opt(False, "dpo, kto: compute the reference log-probs once before training (stored "
                                       "in --output, reused on --resume) instead of in every step")
    data: str | None = _opt(None, "training data: a .jsonl/.json/.csv/.tsv/.parquet/.arrow/.txt file (text ones "
                                  "also .gz, .bz2, .xz, .zst), a save_to_disk folder, or a hub dataset name; several "
                                  "as a,b (a YAML list), mixed; or names registered in --dataset-dir's "
                                  "dataset_info.json")
    dataset_dir: str = _opt("data", "folder of a LLaMA-Factory dataset_info.json, whose registered names --data and "
                                    "--eval-data may give")
    media_dir: str = _opt("", "folder that relative image paths of the data are looked for in when they are not "
                              "beside the data file (LLaMA-Factory's media_dir; empty: --dataset-dir)")
    image_max_pixels: int = _opt(0, "scale each image with more pixels than this down to about this many, keeping "
                                    "its aspect ratio, before the model's processor sees it, as LLaMA-Factory's "
                                    "image_max_pixels does (0: no bound)", range=NON_NEGATIVE)
    image_min_pixels: int = _opt(0, "scale each image with fewer pixels than this up to about this many, as "
                                    "LLaMA-Factory's image_min_pixels (0: no bound)", range=NON_NEGATIVE)
    image_resize: str = _opt("none", "resize rules after the pixel bounds: qwen2-vl = LLaMA-Factory's Qwen2-VL "
                                     "plugin's (a side under 28 px raised to 28, an aspect ratio over 200 cut to "
                                     "180), set by a LLaMA-Factory file whose template uses that plugin; saved with "
                                     "the adapter as the bounds are", choices=RESIZE_RULES)
    data_split: str = _opt("train", "split of --data to train on (hub datasets, DatasetDict folders)")
    data_subset: str | None = _opt(None, "subset (configuration) of a hub dataset that has several")
    max_samples: int = _opt(0, "use only the first N rows of each --data source (0: all)", range=NON_NEGATIVE)
    eval_data: str | None = _opt(None, "held-out data for eval loss and perplexity (same kinds as --data)")
    eval_data_split: str = _opt("test", "split of --eval-data (hub datasets, DatasetDict folders)")
    eval_data_subset: str | None = _opt(None, "subset (configuration) of --eval-data's hub dataset that has several "
                                              "(default: --data-subset, as TRL's dataset_config names both)")
    eval_split: float = _opt(0.0, "without --eval-data: hold out this share of --data (0 < x < 1, rounded up, as "
                                  "LLaMA-Factory's val_size) or this many examples (x >= 1) for eval loss, drawn with "
                                  "--seed (0: none)", range=NON_NEGATIVE)
    eval_split_order: str = _opt("draw", "which rows --eval-split holds out: draw (a --seed draw) or axolotl (the "
                                         "last rows of the data shuffled with --seed, unshuffled under --shuffle "
                                         "false, as axolotl's val_set_size)", ("draw", "axolotl"))
    output: str | None = _opt(None, "output directory (adapter, checkpoints, metrics, plots)")
    format: str = _opt("auto", "data format (auto: detected from the fields of the first rows)",
                       ("auto", "alpaca", "chat", "sharegpt", "prompt-completion", "text"))
    data_fields: str = _opt("", "the dataset's names for our fields, as OURS=THEIRS,...: columns (e.g. "
                                "instruction=question,output=answer, messages=dialog, reasoning=cot, or "
                                "prompt=question for preference and KTO rows), message keys "
                                "(role=from,content=value) and role values (user=human,assistant=gpt)")
    template: str = _opt("auto", "chat template: auto = the model's own (if none: chatml or llama-3 when the "
                                 "vocabulary has their markers, else alpaca), tokenizer = the "
                                 "model's own (required), a built-in one (chatml, llama-3, alpaca), or your own: "
                                 "a Jinja file (.jinja), a tokenizer folder or inline Jinja text; saved with the "
                                 "adapter")
    system_into_user: bool = _opt(False, "fold a system message into the first user turn (for chat templates without "
                                         "a system role, e.g. Gemma 2, Mixtral); saved with the adapter")
    template_date: str = _opt("", "date (YYYY-MM-DD) that date-dependent chat templates (strftime_now) see; empty: the "
                                  "run's start date, recorded in config.yaml and reused on --resume")
    train_on: str = _opt("assistant", "tokens that count in the loss: the assistant turns (and the completion of "
                                      "prompt-completion rows), all, or completion (TRL's SFT default: all but "
                                      "the prompt of prompt-completion rows)", ("assistant", "all", "completion"))
    quant: str = _opt("nf4", "4-bit data type of the frozen base ('none' = 16-bit LoRA)", QUANTS)
    double_quant: bool = _opt(True, "quantize the block constants to 8 bits")
    blocksize: int = _opt(64, "weights per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096")
    quantize_experts: bool = _opt(True, "with a 4-bit base, quantize MoE experts stored as 3-D weights too; false "
                                        "keeps them in the compute dtype, as bitsandbytes under transformers "
                                        "(axolotl without quantize_moe_experts)")
    adapter: str | None = _opt(None, "start from this adapter (PEFT format, e.g. an SFT run's output): it is trained "
                                     "further with its own rank, alpha, targets and options, and its chat format; "
                                     "with --method dpo it is also the reference model")
    rank: int = _opt(16, "LoRA rank r", range=AT_LEAST_1)
    alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / r)", range=POSITIVE)
    dropout: float = _opt(0.05, "LoRA dropout", range=Range(0, 1, high_open=True))
    target_modules: str = _opt("all-linear", "comma-separated layer names to adapt, a regex, all-linear, or none "
                                             "(only --target-parameters)")
    target_parameters: str = _opt("", "comma-separated 3-D MoE expert weights to adapt, one LoRA per expert "
                                      "(PEFT's target_parameters), e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj; "
                                      "gate.weight: the MoE routers' weights; --dropout then defaults to 0 (PEFT allows "
                                      "no other)")
    rslora: bool = _opt(False, "rank-stabilized LoRA: scale = alpha / sqrt(r)")
    rank_pattern: str = _opt("", "per-layer ranks, PEFT's rank_pattern, as NAME=R,...: NAME a regex matching a layer's "
                                 "path or its end (v_proj=8,layers\\.0\\..*=32); other layers get --rank")
    alpha_pattern: str = _opt("", "per-layer alphas, PEFT's alpha_pattern, as NAME=ALPHA,... (as --rank-pattern)")
    lora_bias: bool = _opt(False, "PEFT's lora_bias: LoRA's B gets a trained bias (a merge then needs layers "
                                  "that have a bias)")
    bias: str = _opt("none", "PEFT's bias: also train the base model's biases, all of them or those of the "
                             "adapted layers (lora_only); saved with the adapter", ("none", "all", "lora_only"))
    adalora: bool = _opt(False, "AdaLoRA: SVD-shaped adapters whose ranks are pruned by importance during training "
                                "(--rank is ignored; scale = alpha / adalora-init-r)")
    adalora_init_r: int = _opt(12, "AdaLoRA rank of every layer at the start", range=AT_LEAST_1)
    adalora_target_r: int = _opt(8, "AdaLoRA average rank per layer after pruning", range=AT_LEAST_1)
    adalora_tinit: int = _opt(0, "AdaLoRA warmup steps before pruning starts", range=NON_NEGATIVE)
    adalora_tfinal: int = _opt(0, "AdaLoRA final steps trained with the ranks fixed", range=NON_NEGATIVE)
    adalora_delta_t: int = _opt(1, "AdaLoRA steps between rank reallocations", range=AT_LEAST_1)
    dora: bool = _opt(False, "DoRA: train a magnitude per output row besides the LoRA direction (PEFT's use_dora)")
    init: str = _opt("kaiming", "adapter init, PEFT's init_lora_weights: kaiming, gaussian, loftq (also picks the "
                                "4-bit base so base + BA approximates the full-precision weights; the base is then "
                                "saved with the adapter), pissa (the adapter starts as the top-r SVD part of each "
                                "weight, the base keeps the residual, which is what a 4-bit base quantizes: QPiSSA), "
                                "pissa_niter_K (the same by randomized SVD, K subspace iterations, seeded by --seed) "
                                "or olora (QR instead of SVD); pissa and olora save the adapter converted to rank-2r "
                                "LoRA on the original model")
    loftq_iter: int = _opt(1, "alternating quantize/SVD steps of --init loftq (1 to 5)", range=Range(1, 5))
    add_special_tokens: str = _opt("", "comma-separated special tokens to add to the vocabulary; the embeddings "
                                       "and output head are then trained whole and saved with the adapter")
    eot_tokens: str = _opt("", "comma-separated tokens that end a turn besides the tokenizer's own end markers "
                               "(axolotl's eot_tokens): trained after each trained turn, where the template writes "
                               "them")
    seq_len: int = _opt(512, "maximum tokens per example (longer ones are truncated)", range=Range(2))
    batch_size: int = _opt(1, "examples per micro-batch", range=AT_LEAST_1)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", range=AT_LEAST_1)
    lr: float = _opt(2e-4, "peak learning rate", range=POSITIVE)
    lora_plus_ratio: float = _opt(0.0, "LoRA+: the B matrices learn at this times --lr (the paper uses 16; "
                                       "0: off)", range=NON_NEGATIVE)
    neftune_alpha: float = _opt(0.0, "NEFTune: add uniform noise of scale alpha/sqrt(tokens x width) to the token "
                                     "embeddings while training (the paper uses 5; 0: off)", range=NON_NEGATIVE)
    lr_scheduler: str = _opt("constant", "learning-rate schedule, transformers' lr_scheduler_type with the same "
                                         f"rate at every step: {', '.join(SCHEDULES)}; all but {PLATEAU} (which "
                                         "follows the eval loss of --eval-steps) warm up over the warmup steps, "
                                         "constant too (constant_with_warmup = constant)")
    lr_scheduler_kwargs: str = _opt("", "the schedule's own options, as JSON or KEY=VALUE,... (YAML: a mapping), "
                                        "e.g. min_lr_rate=0.1 for cosine_with_min_lr, num_decay_steps=100 for "
                                        "warmup_stable_decay, num_cycles, power, lr_end, timescale")
    warmup_ratio: float = _opt(0.03, "warmup as a fraction of all steps, rounded up as transformers does (ignored if "
                                     "--warmup-steps > 0)", range=Range(0, 1, high_open=True))
    warmup_steps: int = _opt(0, "warmup steps", range=NON_NEGATIVE)
    epochs: float = _opt(1.0, ("passes over the data, fractions too, as transformers counts them: ceil(units / "
                              "(batch x accum x ranks)) steps an epoch, its last one taking what is left, and "
                              "ceil(epochs x that) steps in all (ignored if --max-steps > 0)"), range=NON_NEGATIVE)
    max_steps: int = _opt(0, "optimizer steps to run (0: from --epochs), on into further epochs counted as --epochs "
                              "counts them", range=NON_NEGATIVE)
    max_steps_per_epoch: int = _opt(0, "optimizer steps of an epoch at most (0: all): each epoch stops after them, "
                                       "the next starting over its own order of the data (torchtune's "
                                       "max_steps_per_epoch)", range=NON_NEGATIVE)
    optim: str = _opt("paged_adamw_32bit", f"optimizer: {', '.join(OPTIMIZER_NAMES)}, or transformers' name for one of "
                                           f"them ({', '.join(OPTIMIZER_ALIASES)})")
    weight_decay: float = _opt(0.0, "AdamW weight decay of the trained weights (biases and norm weights: none, as "
                                    "in transformers)", range=NON_NEGATIVE)
    adam_beta1: float = _opt(0.9, "AdamW beta1: decay rate of the gradient's running mean",
                             range=Range(0, 1, high_open=True))
    adam_beta2: float = _opt(0.999, "AdamW beta2: decay rate of the squared gradient's running mean",
                             range=Range(0, 1, high_open=True))
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon, added to the root of the second moment", range=POSITIVE)
    max_grad_norm: float = _opt(0.3, "clip the gradient norm to this (0: no clipping)", range=NON_NEGATIVE)
    gradient_checkpointing: bool = _opt(False, "recompute each layer in the backward pass to save memory")
    chunked_ce: bool = _opt(True, "compute the loss in chunks of rows, never holding the full float32 logits "
                                  "(used when it reproduces the model's own logits; checked at start)")
    fused_kernels: bool = _opt(False, "swap RMSNorm and SwiGLU MLP modules for fused Triton ones on CUDA (same math; "
                                      "off by default until measured on a GPU; CPU runs keep the PyTorch path)")
    fsdp: bool = _opt(False, "under torchrun: shard the 4-bit base over the ranks with FSDP2 (default: DDP replicas)")
    packing: bool = _opt(False, "pack short examples into --seq-len rows (examples never attend to each other)")
    shuffle: bool = _opt(True, "draw the examples (or packed rows) in a seeded random order each epoch; false: in "
                               "the data's order, packed in that order (axolotl's curriculum_sampling)")
    dedupe: bool = _opt(False, "drop examples (pairs) whose tokens and labels repeat an earlier one's, as axolotl's "
                               "dataset_exact_deduplication; held-out ones also those of the training data, but "
                               "SFT's --eval-data (axolotl's test_datasets), deduplicated on its own")
    group_texts: int = _opt(0, "pre-train on plain texts as LLaMA-Factory's stage pt does: each text + EOS, every "
                               "N texts concatenated and cut into --seq-len blocks (a group's remainder dropped; "
                               "texts in a block attend to each other; tokens equal to the pad token get no loss). "
                               "0: each text is its own example", range=NON_NEGATIVE)
    group_shards: int = _opt(1, "with --group-texts: split the texts into this many contiguous parts first and group "
                                "each on its own (LLaMA-Factory's preprocessing_num_workers)", range=AT_LEAST_1)
    precision: str = _opt("auto", "compute dtype: auto = bf16 on CUDA (fp16 without bf16), fp32 on CPU", PRECISIONS)
    seed: int = _opt(42, "random seed (data order, dropout, initialization)", range=Range(0, 2**32 - 1))
    logging_steps: float = _opt(1, "optimizer steps between metric records, each the mean loss of its steps with "
                                     "the last one's rate and gradient norm (as transformers logs; below 1: that "
                                     "share of the run's steps, rounded up)", range=POSITIVE)
    save_steps: float = _opt(0, "optimizer steps between checkpoints (0: none during training; below 1: that share "
                                "of the run's steps, rounded up, as transformers reads it); the last step (but "
                                "with --save-strategy no) and a Ctrl-C are checkpointed, so --resume can finish a run", range=NON_NEGATIVE)
    eval_steps: float = _opt(0, "optimizer steps between evaluations (0: only at the end; below 1: that share of "
                                "the run's steps, rounded up, as transformers reads it)", range=NON_NEGATIVE)
    eval_strategy: str = _opt("auto", "when to evaluate, as transformers' eval_strategy: steps (every --eval-steps, "
                                      "else --logging-steps, and at the end), epoch (each epoch's end), no "
                                      "(never); auto: as steps, but --eval-steps 0 is the end only", STRATEGIES)
    eval_delay: float = _opt(0, "no evaluation before this many optimizer steps (epochs with --eval-strategy "
                                "epoch), as transformers' eval_delay", range=NON_NEGATIVE)
    eval_on_start: bool = _opt(False, "also evaluate before the first step (recorded at step 0), as transformers' "
                                      "eval_on_start; a --resume does not evaluate again")
    save_strategy: str = _opt("auto", "when to checkpoint, as transformers' save_strategy: steps (every --save-steps, "
                                      "else 500), epoch (each epoch's end), no (none, but at Ctrl-C); auto: every "
                                      "--save-steps; all but no also checkpoint the last step", STRATEGIES)
    logging_strategy: str = _opt("steps", "when to write a metric record: steps (every --logging-steps), epoch "
                                          "(each epoch's end), no (the last step only)", LOGGING_STRATEGIES)
    save_total_limit: int = _opt(2, "checkpoints to keep (oldest are deleted; 0: all)", range=NON_NEGATIVE)
    resume: bool = _opt(False, "continue from the last checkpoint in --output")
    overwrite: bool = _opt(False, "replace qlora's earlier results in an existing --output (only files qlora "
                                  "wrote; anything else there is kept)")
    progress: bool = _opt(True, "show a live progress bar")

    def __post_init__(self) -> None:
        """Other tools' names for our optimizers, schedules and templates become ours, and the schedule's kwargs
        one canonical JSON text, so a checkpoint compares equal however they were spelled. A config built in Python
        (``TrainConfig(lr="2e-4", target_modules=["q_proj", "v_proj"])``) gets its values converted as a YAML
        file's are, or refused naming the option."""
        for f in fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), field_type(f), "TrainConfig"))
        self.optim = OPTIMIZER_ALIASES.get(self.optim, self.optim)
        self._digests: dict[str, str] = {}  # a template file's text digest, by path (see run_defining)
        self._sources: dict[str, dict[str, Fingerprint]] | None = None  # fingerprints of the files read (idem)
        try:
            self.template = self.template if is_custom(self.template) else template_name(self.template)
        except ValueError:
            pass  # validate() says what is wrong
        self.lr_scheduler = SCHEDULE_ALIASES.get(self.lr_scheduler, self.lr_scheduler)
        try:
            kwargs = parse_schedule_kwargs(self.lr_scheduler_kwargs)
        except UsageError:
            return  # validate() says what is wrong
        self.lr_scheduler_kwargs = json.dumps(kwargs, sort_keys=True) if kwargs else ""

    def to_dict(self) -> dict[str, Any]:
        """Plain values, in field order, for YAML and checkpoint comparison."""
        return dataclasses.asdict(self)

    def run_defining(self, world_size: int = 1) -> dict[str, Any]:
        """The options a checkpoint must agree on to be resumed.

        The batch is recorded as the global batch (per-device batch x
        accumulation x ranks), so a checkpoint resumes on any number of ranks
        that keeps it, e.g. 2 ranks x batch 2 -> 1 rank x batch 2 x accum 2.
        """
        values = {k: getattr(self, k) for k in _RUN_DEFINING}
        if self.eval_split and self.eval_split_order != "draw":  # absent otherwise: older checkpoints resume
            values["eval_split_order"] = self.eval_split_order
        if self.method != "sft":  # absent for SFT, so checkpoints from before preference methods still resume
            values.update({k: getattr(self, k) for k in ("method", "beta", *_METHOD_OPTIONS)})
        if self.lr_scheduler == PLATEAU:  # its rates follow the eval losses
            values.update({k: getattr(self, k) for k in ("eval_data", "eval_data_split", "eval_steps")})
            if self.eval_data_subset is not None:  # absent otherwise: checkpoints from before the option resume
                values["eval_data_subset"] = self.eval_data_subset
            if self.eval_strategy != "auto":  # absent otherwise: checkpoints from before the strategies resume
                values["eval_strategy"] = self.eval_strategy
            if self.eval_delay:  # absent otherwise: checkpoints from before it resume
                values["eval_delay"] = self.eval_delay
        values["global_batch"] = values.pop("batch_size") * values.pop("grad_accum") * world_size
        if is_custom(self.template) and not is_inline(self.template):  # the file may change under the same path
            if self.template not in self._digests:  # read once: the checkpoints of a run record the text it read
                self._digests[self.template] = template_digest(self.template)
            values["template_sha256"] = self._digests[self.template]
        if self._sources is None:  # read once, as the template's text
            self._sources = self._source_files("eval_data" in values)
        values["source_files"] = self._sources
        return values

    def _source_files(self, with_eval: bool) -> dict[str, dict[str, Fingerprint]]:
        """Fingerprints of the local files the run reads (data, model, starting adapter), by the option naming them
        (see :mod:`qlora.train.file_fingerprint`)."""
        from qlora.train.data.selection import source_locations  # torch: not imported for --help

        files = {"--model": model_fingerprints(self.model) if self.model else {}}
        if self.adapter:
            files["--adapter"] = model_fingerprints(self.adapter)
        for option, spec in (("--data", self.data), ("--eval-data", self.eval_data if with_eval else None)):
            if spec:
                files[option] = {k: v for source in source_locations(spec, self.dataset_dir, self.method)
                                 for k, v in data_fingerprints(source).items()}
        return files

    def validate(self) -> None:
        """Check choices and ranges; missing required options.

        Raises:
            UsageError: naming the option and the allowed values.
        """
        if not self.model and self.adapter:  # the base would have come from the adapter folder's own config
            check_adapter_path(self.adapter)
            raise UsageError(f"--model is required (or set `model:` in the YAML file): --adapter {self.adapter} is not "
                             "a local adapter folder whose adapter_config.json names its base model; give the base "
                             "with --model, or --adapter the folder of a saved adapter")
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise UsageError(f"--{name.replace('_', '-')} is required (or set `{name}:` in the YAML file)")
        self._validate_schedule()
        try:
            read_template(self.template) if is_custom(self.template) else template_name(self.template)
        except UsageError:  # read_template's own message names the option and the file
            raise
        except ValueError as exc:
            raise UsageError(f"--template: {exc}; or give your own chat template as a .jinja file") from None
        for name in _STEP_SHARES:
            value = getattr(self, name)
            if value > 1 and not float(value).is_integer():
                raise UsageError(f"--{_flag(name)} {value}: give a whole number of steps, or a share of the run's "
                                 "steps below 1 (e.g. 0.25: every quarter of the run).")
        if self.save_strategy == "best":
            raise UsageError("--save-strategy best: qlora keeps no best checkpoint (nor load_best_model_at_end); use "
                             "--save-strategy epoch or steps with the same --eval-strategy and pick the checkpoint "
                             "of the lowest eval loss in metrics.jsonl.")
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{_flag(f.name)} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
            if f.metadata["range"] is not None:
                f.metadata["range"].check(f"--{_flag(f.name)}", getattr(self, f.name))
        if self.blocksize not in BLOCKSIZES:
            raise UsageError(f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))} (a power of two "
                             f"from 32 to 4096, as bitsandbytes accepts); got {self.blocksize}")
        if self.adalora and self.adalora_target_r > self.adalora_init_r:
            raise UsageError(f"--adalora-target-r ({self.adalora_target_r}) cannot exceed --adalora-init-r "
                             f"({self.adalora_init_r}): AdaLoRA only prunes ranks")
        if self.adalora and (self.dora or self.init != "kaiming"):
            raise UsageError("--adalora does not combine with --dora or --init: AdaLoRA has its own SVD-shaped "
                             "adapters and initialization")
        for name in ("rank_pattern", "alpha_pattern"):
            parse_pattern(name, getattr(self, name))  # checked before the model loads
        if self.adapter:
            check_adapter_path(self.adapter)  # named by its option, where _validate_adapter would read it
            self._validate_adapter()
        if self.adalora and (self.rank_pattern or self.alpha_pattern or self.lora_bias):
            raise UsageError("--rank-pattern, --alpha-pattern and --lora-bias are LoRA options; --adalora sets "
                             "its ranks itself and has no LoRA bias")
        if self.adalora and self.rslora:
            raise UsageError("--adalora and --rslora do not combine: AdaLoRA scales by alpha / adalora-init-r")
        if self.init not in INITS and not is_residual_init(self.init):
            raise UsageError(f"--init must be one of {', '.join(INITS)} or pissa_niter_K (K >= 0: PiSSA by "
                             f"randomized SVD with K subspace iterations); got {self.init!r}")
        if is_residual_init(self.init) and (self.dora or self.lora_bias or self.target_parameters):
            what = "--dora" if self.dora else "--lora-bias" if self.lora_bias else "--target-parameters"
            raise UsageError(f"--init {self.init} does not combine with {what}: the adapter is saved converted to "
                             "plain LoRA on the original weights, which DoRA's magnitudes and a LoRA bias do not "
                             "survive, and PEFT has no PiSSA/OLoRA for expert weights. Drop one of them.")
        if self.init == "loftq" and self.quant == "none":
            raise UsageError("--init loftq picks a 4-bit base; it needs --quant nf4 or fp4")
        self._validate_method()
        if self.group_texts and self.packing:
            raise UsageError("--group-texts and --packing both lay several texts in a row; --group-texts cuts their "
                             "stream into blocks where texts attend to each other (LLaMA-Factory's stage pt), "
                             "--packing keeps whole examples apart: give one.")
        if self.dedupe and self.group_texts:
            raise UsageError("--dedupe compares tokenized examples; --group-texts cuts blocks from the texts' stream "
                             "instead. Remove the duplicate texts from the data, and drop --dedupe.")
        if self.group_shards != 1 and not self.group_texts:
            raise UsageError(f"--group-shards {self.group_shards} splits the texts that --group-texts groups; "
                             "this run has no --group-texts.")
        if self.image_max_pixels and self.image_max_pixels < self.image_min_pixels:
            raise UsageError(f"--image-max-pixels ({self.image_max_pixels}) is below --image-min-pixels "
                             f"({self.image_min_pixels}); give a maximum at least the minimum, or 0 for none.")
        if self.eval_split and self.eval_data:
            raise UsageError("--eval-split holds out part of --data for evaluation; this run has --eval-data "
                             f"{self.eval_data} for that: give one of the two.")
        if self.eval_data_subset is not None and not self.eval_data:
            raise UsageError(f"--eval-data-subset {self.eval_data_subset} picks a subset of --eval-data, and this run "
                             "has none; give --eval-data (or --data-subset for --data).")
        self._validate_eval()
        if self.lora_plus_ratio and self.adalora:
            raise UsageError("--lora-plus-ratio applies to LoRA's B matrices; --adalora's triplets have none")
        if self.max_steps == 0 and not self.epochs > 0:
            raise UsageError("give --epochs > 0 or --max-steps > 0")
        if self.template_date:
            pinned_datetime(self.template_date)  # YYYY-MM-DD, checked before the model loads
        parse_data_fields(self.data_fields)  # checked before the model loads

    def _validate_schedule(self) -> None:
        """--optim and --lr-scheduler by name (saying what qlora has instead), and the schedule's kwargs
        by name and value, before the model loads."""
        for name, canonical in (("optim", optimizer_name), ("lr_scheduler", schedule_name)):
            try:
                canonical(getattr(self, name))
            except ValueError as exc:
                raise UsageError(f"--{_flag(name)}: {exc}") from None
        kwargs = parse_schedule_kwargs(self.lr_scheduler_kwargs)
        try:  # the steps are known only once the data is read; the trainer checks them against the schedule
            check_schedule(self.lr_scheduler, self.lr, kwargs)
        except ValueError as exc:
            raise UsageError(f"--lr-scheduler-kwargs: {exc}.") from None
        evaluates = self.eval_strategy in ("steps", "epoch") or self.eval_strategy == "auto" and self.eval_steps
        if self.lr_scheduler == PLATEAU and not (evaluates and (self.eval_data or self.eval_split)):
            raise UsageError(f"--lr-scheduler {PLATEAU} lowers the rate when the eval loss stops improving: give "
                             "--eval-steps N and held-out data (--eval-data or --eval-split), as transformers "
                             "needs an eval strategy for it (or --eval-strategy epoch).")

    def _validate_eval(self) -> None:
        """An evaluation asked for needs held-out data: transformers' Trainer refuses an eval_strategy without an
        eval_dataset, where a run here would evaluate nothing and say nothing."""
        if self.eval_data or self.eval_split:
            return
        if self.eval_on_start:
            raise UsageError("--eval-on-start evaluates on held-out data before the first step, and this run has "
                             "none: give it with --eval-data FILE (eval_dataset, axolotl's test_datasets) or hold "
                             "out part of --data with --eval-split (LLaMA-Factory's val_size, axolotl's "
                             "val_set_size), or leave --eval-on-start out.")
        if self.eval_strategy not in ("steps", "epoch"):
            return
        raise UsageError(f"--eval-strategy {self.eval_strategy} evaluates on held-out data, and this run has none: "
                         "give it with --eval-data FILE (eval_dataset, axolotl's test_datasets) or hold out part of "
                         "--data with --eval-split (a share below 1 or a number of examples; LLaMA-Factory's "
                         "val_size, axolotl's val_set_size), or set --eval-strategy no.")

    def _validate_adapter(self) -> None:
        """--adapter brings its own LoRA settings: giving them too is a contradiction, said before the load."""
        from qlora.model.adapter_io import read_adapter_config

        saved = read_adapter_config(self.adapter)
        if self.adalora or saved.get("peft_type") == "ADALORA":
            raise UsageError("--adapter continues a LoRA adapter; AdaLoRA's rank schedule cannot be continued "
                             "(neither --adalora nor an AdaLoRA adapter works with it).")
        defaults = {f.name: f.default for f in fields(self)}
        given = [n for n in _ADAPTER_SHAPED if getattr(self, n) != defaults[n]]
        if given:
            raise UsageError(f"--adapter {self.adapter} brings its own {', '.join('--' + _flag(n) for n in given)} "
                             f"(rank {saved.get('r')}, alpha {saved.get('lora_alpha')}, targets "
                             f"{saved.get('target_modules')}); drop {'it' if len(given) == 1 else 'them'}, or train a "
                             "new adapter without --adapter.")

    @property
    def media_folder(self) -> str:
        """Where relative image paths not beside their data file are looked for (LLaMA-Factory's media_dir, which
        defaults to its dataset_dir)."""
        return self.media_dir or self.dataset_dir

    @property
    def pixel_bounds(self) -> PixelBounds:
        """The pixel bounds and resize rules of this run's images (saved with its adapter)."""
        return PixelBounds(self.image_max_pixels, self.image_min_pixels, self.image_resize)

    @property
    def rewrites_base(self) -> bool:
        """Whether --init changes the base weights (LoftQ, PiSSA, OLoRA): on a 4-bit base it is computed layer
        by layer while the model loads (:mod:`qlora.model.streamed_init`)."""
        return self.init == "loftq" or is_residual_init(self.init)

    def _validate_method(self) -> None:
        """Options that belong to some training methods only, and the loss types of each."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, methods in _METHOD_OPTIONS.items():
            if getattr(self, name) != defaults[name] and self.method not in methods and not (
                    name == "loss_type" and self.method == "simpo" and self.loss_type == "simpo"):
                raise UsageError(f"--{_flag(name)} applies to --method {', '.join(methods)}; this run is "
                                 f"--method {self.method}")
        if self.method == "sft":
            return
        if self.method == "dpo":
            self._validate_dpo_losses()
        elif self.method == "cpo":
            loss = self.loss_type or "sigmoid"
            if loss not in CPO_LOSSES:
                hint = {"alphapo": "; TRL's alphapo is its simpo loss without the NLL term: --method simpo with "
                                   "--alphapo-alpha A"}.get(loss, "; for DPO losses use --method dpo"
                                                            * (loss in DPO_LOSSES))
                raise UsageError(f"--loss-type {loss!r} is not a loss of --method cpo (TRL's CPOTrainer): choose one "
                                 f"of {', '.join(CPO_LOSSES)}{hint}")
        elif self.method == "kto":
            loss = self.loss_type or "kto"
            if loss not in KTO_LOSSES:
                raise UsageError(f"--loss-type {loss!r} is not a loss of --method kto (TRL's KTOTrainer): choose one "
                                 f"of {', '.join(KTO_LOSSES)}")
            if loss == "kto" and self.batch_size < 2:
                raise UsageError("--method kto estimates its KL term from the other examples of a micro-batch (each "
                                 "prompt with another completion): give --batch-size 2 or more (TRL requires it too)")
        if self.method in ("cpo", "simpo"):
            loss = self.preference_losses()[0][0]
            if self.label_smoothing and loss in ("hinge", "ipo"):
                raise UsageError(f"--label-smoothing applies to the sigmoid and simpo losses; --loss-type {loss} has none")
            if self.simpo_gamma != defaults["simpo_gamma"] and loss != "simpo":
                raise UsageError("--simpo-gamma is SimPO's target margin: it applies to --method simpo (or --method "
                                 "cpo --loss-type simpo)")
        if self.group_texts:
            raise UsageError(f"--group-texts applies to --method sft (pre-training on plain texts); --method "
                             f"{self.method} trains on prompts and answers")
        if self.packing:
            raise UsageError(f"--packing applies to --method sft; --method {self.method} batches each pair's chosen "
                             "and rejected answers side by side")
        if self.neftune_alpha:
            raise UsageError(f"--neftune-alpha applies to --method sft (noisy embeddings for instruction tuning); "
                             f"--method {self.method} compares answers under the clean model")
        if self.format != "auto":
            raise UsageError(f"--format applies to --method sft; --method {self.method} reads preference rows "
                             '{"prompt", "chosen", "rejected"}' + ' or {"prompt", "completion", "label"}' *
                             (self.method == "kto") + " (map other column names with --data-fields)")

    def _validate_dpo_losses(self) -> None:
        names = [n for n, _ in self.preference_losses()]
        for name in names:
            if name in DPO_LOSSES:
                continue
            hint = {"simpo": "; SimPO is reference-free: --method simpo", "orpo": "; ORPO is --method orpo",
                    "kto_pair": "; TRL removed kto_pair (KTO learns from unpaired data)",
                    "aot_pair": "; TRL 1.16 calls it aot_unpaired"}.get(name, "")
            raise UsageError(f"--loss-type {name!r} is not a DPO loss: choose among {', '.join(DPO_LOSSES)}{hint}")
        if self.rpo_alpha and names.count("sft") > 1:
            raise UsageError("--rpo-alpha adds the sft loss type; this run lists sft in --loss-type already: give one")
        if self.loss_weights:
            weights = self.loss_weights.split(",")
            listed = len(self.loss_type.split(",")) if self.loss_type else 1
            if len(weights) != listed:
                raise UsageError(f"--loss-weights has {len(weights)} weights for {listed} loss type(s) of --loss-type "
                                 f"{self.loss_type or 'sigmoid'}: give one weight for each")
        smoothless = [n for n in names if n not in DPO_SMOOTHED]
        if self.label_smoothing and smoothless:
            raise UsageError(f"--label-smoothing does not apply to the DPO loss {', '.join(smoothless)}; it applies to "
                             f"{', '.join(DPO_SMOOTHED[:-1])}")
        if "exo_pair" in names and not self.label_smoothing:
            raise UsageError("--loss-type exo_pair needs --label-smoothing > 0 (its epsilon; the EXO paper uses 1e-3)")
        if self.discopop_tau != 0.05 and "discopop" not in names:
            raise UsageError("--discopop-tau applies to --loss-type discopop")
        if self.f_divergence_type != "reverse_kl":
            other = [n for n in names if n not in F_DIVERGENCE_LOSSES]
            if other:
                raise UsageError(f"--f-divergence-type {self.f_divergence_type} applies to the DPO losses of the "
                                 f"reward difference ({', '.join(F_DIVERGENCE_LOSSES)}); {', '.join(other)} has no "
                                 "f-divergence form (as in TRL): use reverse_kl with it")
        if self.f_alpha_divergence_coef != 0.5 and self.f_divergence_type != "alpha_divergence":
            raise UsageError("--f-alpha-divergence-coef applies to --f-divergence-type alpha_divergence")
        if self.wpo and {"aot", "aot_unpaired"} & set(names):
            raise UsageError("--wpo weighs each pair by its own answers; the aot and aot_unpaired losses sort the "
                             "pairs of a batch, so a pair's loss is no longer its own (TRL refuses them too)")
        if self.wpo and "sft" in names:
            raise UsageError("--wpo weighs the pair losses; with the NLL term (--rpo-alpha, loss type sft) TRL 1.16 "
                             "also weighs that term, but fails doing so (it scales the NLL in place), so there is "
                             "no reference to match: train --wpo without --rpo-alpha and sft")

    def preference_losses(self) -> list[tuple[str, float]]:
        """The (loss type, weight) terms of a preference run; --rpo-alpha is DPO's ``sft`` term.

        Raises:
            UsageError: a --loss-weights item that is not a non-negative number.
        """
        if self.method == "simpo":
            return [("simpo", 1.0)]
        if self.method in ("cpo", "kto"):
            return [(self.loss_type or {"cpo": "sigmoid", "kto": "kto"}[self.method], 1.0)]
        if self.method != "dpo":
            return []
        names = [n.strip() for n in (self.loss_type or "sigmoid").split(",")]
        weights = [1.0] * len(names)
        if self.loss_weights:
            try:
                weights = [float(w) for w in self.loss_weights.split(",")]
            except ValueError:
                weights = []
            if any(not 0 <= w < float("inf") for w in weights) or not weights:
                raise UsageError(f"--loss-weights must be non-negative numbers, as 1,0.5; got {self.loss_weights!r}")
        terms = list(zip(names, weights))
        if not any(w for _, w in terms) and not self.rpo_alpha:
            raise UsageError(f"--loss-weights {self.loss_weights} weighs every loss type by 0: the loss would be 0 and "
                             "nothing would be learned; give at least one weight above 0.")
        return terms + [("sft", self.rpo_alpha)] if self.rpo_alpha else terms

    @property
    def nll_weight(self) -> float:
        """Weight of the chosen answers' NLL in a preference loss: ORPO's 1, CPO's cpo_alpha, DPO's sft terms."""
        if self.method == "orpo":
            return 1.0
        if self.method in ("cpo", "simpo"):
            return self.cpo_alpha if self.cpo_alpha is not None else float(self.method == "cpo")
        return sum(w for n, w in self.preference_losses() if n == "sft")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Options that shape an adapter; with --adapter they come from the adapter's config.
_ADAPTER_SHAPED = ("rank", "alpha", "dropout", "target_modules", "target_parameters", "rslora", "rank_pattern",
                   "alpha_pattern", "lora_bias", "bias", "dora", "init", "loftq_iter", "add_special_tokens")


def target_module_names(spec: str) -> list[str] | str:
    """``--target-modules`` as the trainer reads it: no layers (``none``), a list of names, or one string (a keyword
    such as ``all-linear``, or PEFT's regex of whole module paths)."""
    if spec.strip().lower() in ("none", ""):
        return []
    if "," in spec or spec.isidentifier():
        return [t.strip() for t in spec.split(",") if t.strip()]
    return spec


def parse_pattern(name: str, spec: str) -> dict[str, float]:
    """``--rank-pattern``/``--alpha-pattern`` (``NAME=VALUE,...``) as PEFT's ``{regex: value}``."""
    out: dict[str, float] = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        key, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not key.strip() or number is None or number <= 0 or (
                name == "rank_pattern" and not number.is_integer()):
            kind = "a positive integer rank" if name == "rank_pattern" else "a positive alpha"
            raise UsageError(f"--{_flag(name)}: {item!r} is not NAME=VALUE with {kind} (e.g. v_proj=8).")
        out[key.strip()] = int(number) if name == "rank_pattern" else number
    return out


def parse_schedule_kwargs(text: str | None) -> dict[str, Any]:
    """``--lr-scheduler-kwargs`` as a dict: a JSON object or ``KEY=VALUE,...`` (each value read as JSON
    when it is JSON, e.g. a number, else as text); empty or None (YAML ``null``): none."""
    text = (text or "").strip()
    if text.startswith("{"):
        try:
            value = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--lr-scheduler-kwargs: {text!r} is not a JSON object ({exc.msg}).") from None
        if not isinstance(value, dict):
            raise UsageError(f"--lr-scheduler-kwargs: {text!r} is not a JSON object.")
        return value
    out: dict[str, Any] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--lr-scheduler-kwargs: {item!r} is not KEY=VALUE; give e.g. min_lr_rate=0.1 or a "
                             'JSON object {"min_lr_rate": 0.1}.')
        if key.strip() in out:
            raise UsageError(f"--lr-scheduler-kwargs: {key.strip()} is given twice; give it once.")
        try:
            out[key.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object of ``--lr-scheduler-kwargs``, refusing a key given twice (JSON readers keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"--lr-scheduler-kwargs: {key} is given twice; give it once.")
        out[key] = value
    return out


# Options counted in steps that also take a share of the run's steps (below 1).
_STEP_SHARES = ("save_steps", "eval_steps", "logging_steps")
_STRATEGY_FIELDS = ("eval_strategy", "save_strategy", "logging_strategy")


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    """Convert a YAML or flag value to the field's type, with a clear error."""
    if value is None:
        return None
    if kind is str and isinstance(value, (list, dict)) and name not in _LIST_FIELDS:
        shape = "a list" if isinstance(value, list) else "a mapping"
        raise UsageError(f"{source}: {name} takes one value, got {shape} {value!r}; write it as a single "
                         f"{name}: VALUE.")
    if name in _STRATEGY_FIELDS and value is False:
        return "no"  # YAML reads an unquoted `save_strategy: no` as false
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if kind is str and isinstance(value, list) and any(isinstance(v, dict) for v in value):
            return json.dumps(value)  # data: a list with axolotl-style dataset mappings
        if kind is str and isinstance(value, list):  # YAML lists of names or tokens
            return ",".join(str(v) for v in value)
        if kind is str and isinstance(value, dict) and name in _JSON_FIELDS:  # typed values: numbers stay numbers
            return json.dumps(value)
        if kind is str and isinstance(value, dict):  # YAML mappings (data_fields: {instruction: question})
            return ",".join(f"{k}={v}" for k, v in value.items())
        if kind in (int, float) and isinstance(value, bool):  # YAML's true is not the number 1
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if name in _STEP_SHARES and float(value).is_integer():
            return int(float(value))  # a count of steps stays a count (8, not 8.0, in the saved config)
        return kind(value)
    except (TypeError, ValueError):
        if source == "command line":  # named as the user typed it
            what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)
            raise UsageError(f"--{_flag(name)} expects {what}, got {value!r}") from None
        raise UsageError(f"{source}: {name} expects {kind.__name__}, got {value!r}") from None


# Flags whose empty value is a choice: no target modules (with --target-parameters, the experts alone). Any other flag
# given empty (``--adapter "$ADAPTER"`` unset) would otherwise read as left out, or as the working folder.
_BLANK_OK = frozenset({"target_modules"})
_JSON_FIELDS = ("lr_scheduler_kwargs",)
# Text options that YAML may give as a list (of names, files, tokens, weights) or a mapping (NAME: VALUE).
_LIST_FIELDS = frozenset({"data", "eval_data", "loss_type", "loss_weights", "target_modules", "target_parameters",
                          "add_special_tokens", "eot_tokens", "data_fields", "rank_pattern", "alpha_pattern",
                          "lr_scheduler_kwargs"})
_TYPES = {"str | None": str, "str": str, "int": int, "float": float, "float | None": float, "bool": bool}


def field_type(f: dataclasses.Field) -> type:
    """The Python type of a :class:`TrainConfig` field (annotations are strings)."""
    return _TYPES[str(f.type)]


# Keys of PEFT / transformers TrainingArguments / TRL / axolotl / LLaMA-Factory configs -> ours.
ALIASES = {
    "learning_rate": "lr", "lora_r": "rank", "lora_rank": "rank", "r": "rank", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "num_epochs": "epochs", "num_train_epochs": "epochs", "output_dir": "output",
    "cutoff_len": "seq_len", "sequence_len": "seq_len", "max_seq_length": "seq_len", "max_seq_len": "seq_len",
    "max_length": "seq_len", "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "model_name_or_path": "model", "base_model": "model",
    "dataset": "data", "data_path": "data", "train_file": "data", "eval_file": "eval_data",
    "evaluation_strategy": "eval_strategy",  # transformers' name before 4.46
    "lr_scheduler_type": "lr_scheduler", "lora_target_modules": "target_modules", "lora_target": "target_modules",
    "lora_target_parameters": "target_parameters",
    "use_rslora": "rslora", "use_dora": "dora", "bnb_4bit_quant_type": "quant",
    "bnb_4bit_use_double_quant": "double_quant", "overwrite_output_dir": "overwrite", "sample_packing": "packing",
    "optimizer": "optim", "chat_template": "template", "val_size": "eval_split", "val_set_size": "eval_split",
    "loraplus_lr_ratio": "lora_plus_ratio", "neftune_noise_alpha": "neftune_alpha",
    "quantization_type": "quant", "double_quantization": "double_quant", "eval_dataset": "eval_data",
    "pref_beta": "beta", "dpo_label_smoothing": "label_smoothing", "kto_chosen_weight": "desirable_weight",
    "kto_rejected_weight": "undesirable_weight", "rl_beta": "beta", "orpo_alpha": "beta",
    "use_weighting": "wpo", "precompute_ref_log_probs": "precompute_ref",
    "kto_desirable_weight": "desirable_weight", "kto_undesirable_weight": "undesirable_weight",
    "lora_model_dir": "adapter", "dataset_name": "data", "dataset_config": "data_subset",
    "dataset_train_split": "data_split", "dataset_test_split": "eval_data_split", "use_bnb_nested_quant": "double_quant",
    "peft_use_rslora": "rslora", "peft_use_dora": "dora", "dataset_exact_deduplication": "dedupe",
    "quantize_moe_experts": "quantize_experts",
}
# Boolean keys that map onto one of ours: key -> (our key, {their value: our value, None = no change}).
VALUE_ALIASES = {
    "train_on_inputs": ("train_on", {True: "all", False: "assistant"}),
    "train_on_prompt": ("train_on", {True: "all", False: "assistant"}),
    "neat_packing": ("packing", {True: True, False: None}),  # LLaMA-Factory's: packed examples kept apart, as ours
    "bf16": ("precision", {True: "bf16", False: None, "auto": None}),  # axolotl's auto: bf16 where the GPU has it
    "fp16": ("precision", {True: "fp16", False: None}),
    "curriculum_sampling": ("shuffle", {True: False, False: None}),  # axolotl's: its sampler in the data's order
    "lora_target_linear": ("target_modules", {True: "all-linear", False: None}),
    "disable_gradient_checkpointing": ("gradient_checkpointing", {True: False, False: True}),  # LLaMA-Factory's
    # TRL's preference configs (on by default there): every dropout of the policy off, the LoRA dropout included
    "disable_dropout": ("dropout", {True: 0.0, False: None}),
}


def canonical_name(key: str) -> str:
    """Our option name for ``key`` (``-`` or ``_``, ours or another tool's alias)."""
    name = key.replace("-", "_")
    return ALIASES.get(name, name)


def _unknown(key: str, known: list[str], source: str) -> UsageError:
    candidates = {k: k for k in known} | {a: ALIASES[a] for a in ALIASES}
    close = difflib.get_close_matches(key.replace("-", "_"), list(candidates), n=3, cutoff=0.6)
    close = list(dict.fromkeys(candidates[c] for c in close))
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return UsageError(f"{source}: unknown option {key!r}{hint}")


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """The mapping in ``path`` and the line of each top-level key; errors name the file and line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    try:
        node = yaml.compose(text)
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where}: not valid YAML ({problem}).") from None
    if loaded is None:
        return {}, {}
    if not isinstance(loaded, dict):
        raise UsageError(f"{path}: expected a mapping of option: value, got {type(loaded).__name__}")
    return loaded, _key_lines(node, path, "")


def _key_lines(node: Any, path: Path, where: str) -> dict[str, int]:
    """``{key: line}`` of a YAML mapping node, refusing a key given twice in it or in any mapping nested in it
    (``lr_scheduler_kwargs: {power: 1, power: 2}``): YAML readers keep the last one silently."""
    import yaml

    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _key_lines(item, path, where)
    if not isinstance(node, yaml.MappingNode):
        return {}
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        if key in seen:
            raise UsageError(f"{path} line {key_node.start_mark.line + 1}: {where + ': ' if where else ''}{key!r} "
                             f"is given twice (first on line {seen[key]}); keep one.")
        seen[key] = key_node.start_mark.line + 1
        _key_lines(value_node, path, f"{where}.{key}" if where else key)
    return seen


# LLaMA-Factory's pref_loss values that are one of qlora's losses: (method, loss_type).
_PREF_LOSSES = {"sigmoid": ("dpo", "sigmoid"), "hinge": ("dpo", "hinge"), "ipo": ("dpo", "ipo"), "simpo": ("simpo", "")}

# What a LLaMA-Factory run trains with where its file is silent: its own defaults (lora_rank, lora_dropout,
# cutoff_len, gradient checkpointing on; lora_alpha is twice the rank; no quantization without
# quantization_bit) and those of transformers' TrainingArguments, which it extends (save_strategy steps: a
# checkpoint every save_steps, 500 unless given).
_LLAMA_FACTORY_DEFAULTS = {"rank": 8, "dropout": 0.0, "seq_len": 2048, "lr": 5e-5, "lr_scheduler": "linear",
                           "epochs": 3.0, "batch_size": 8, "max_grad_norm": 1.0, "gradient_checkpointing": True,
                           "image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32, "save_strategy": "steps"}


# LLaMA-Factory's export (merge, quantize) and inference arguments: a training file (one with a stage) may carry
# them for the later run; a file without a stage is that run, refused by foreign_keys naming qlora's command for it.
_LLAMA_FACTORY_AFTER = ("export_", "infer_", "vllm_", "sglang_")


def _llama_factory(loaded: dict, lines: dict[str, int], path: Path,
                   overridden: frozenset[str] = frozenset()) -> dict:
    """LLaMA-Factory's ``stage``, ``pref_loss`` and ``pref_ftx`` as qlora's method and loss type (stage pt: SFT on
    raw texts); what has no identical counterpart is refused by name rather than trained differently. A file with
    a ``stage`` is LLaMA-Factory's: the keys it leaves out take LLaMA-Factory's defaults, not qlora's. Its other
    keys are translated by :mod:`qlora.train.foreign_keys`; ``overridden``: the options the command line sets."""
    keys = {"stage", "pref_loss", "pref_ftx"} & set(loaded)
    if not keys:
        return loaded
    out = {k: v for k, v in loaded.items() if k not in keys}
    if "stage" in loaded:
        unused = [k for k in out if str(k).startswith(_LLAMA_FACTORY_AFTER)]
        if unused:  # a training file that also holds the settings of its export or inference run
            print(f"qlora train: {path}: passing over {', '.join(map(str, unused))}: LLaMA-Factory's export and "
                  "inference settings, which its training does not read", file=sys.stderr)
            out = {k: v for k, v in out.items() if k not in unused}
        applied = _llama_factory_defaults(out, lines, lines.get("stage", 0))
        if applied:
            print(f"qlora train: {path} is a LLaMA-Factory file (stage): what it leaves out takes LLaMA-Factory's "
                  f"defaults: {', '.join(f'{k} {v}' for k, v in applied.items())}", file=sys.stderr)
    where = {k: f"{path} line {lines.get(k, '?')}" for k in keys}
    ftx, stage, loss = loaded.get("pref_ftx"), loaded.get("stage"), loaded.get("pref_loss")
    if ftx not in (None, 0, 0.0):
        raise UsageError(f"{where['pref_ftx']}: pref_ftx is LLaMA-Factory's SFT term: each chosen answer's NLL averaged "
                         "over its own tokens, then over the pairs. qlora's --rpo-alpha (dpo; TRL's RPO) and "
                         "--cpo-alpha (cpo, simpo) average the NLL over all chosen tokens of the batch, which weighs "
                         "answers of different lengths differently; set rpo_alpha or cpo_alpha to train with that term.")
    if stage is not None and stage not in ("sft", "dpo", "kto", "pt"):
        raise UsageError(f"{where['stage']}: stage {stage!r} has no qlora counterpart; qlora trains stage sft, pt, kto "
                         "and stage dpo (pref_loss sigmoid, hinge, ipo or simpo) as method sft / kto / dpo / simpo, "
                         "and method orpo or cpo.")
    batch_key = next((k for k in out if canonical_name(str(k)) == "batch_size"), None)
    if (stage == "kto" and batch_key and "batch_size" not in overridden and isinstance(out[batch_key], int)
            and out[batch_key] < 2):
        raise UsageError(f"{path} line {lines.get(batch_key, '?')}: {batch_key} {out[batch_key]} with stage kto: "
                         "LLaMA-Factory pairs each prompt with another row's completion for KTO's KL term when it "
                         "tokenizes the data; qlora, as TRL, takes them from the other examples of a micro-batch, "
                         "so it needs 2 or more (e.g. 8, with gradient_accumulation_steps divided by 8 to keep "
                         "the examples per step).")
    method = stage
    if stage == "pt":  # pre-training: every token of raw texts
        method = "sft"
        out.setdefault("format", "text")
        _pretrain_blocks(out, lines, path)
    elif stage == "sft" and (out.get("packing") is True or out.get("neat_packing") is True):
        _sft_packing(out, path)
    if loss is not None:
        if stage not in (None, "dpo"):
            raise UsageError(f"{where['pref_loss']}: pref_loss applies to stage dpo; this config is stage {stage}.")
        if not isinstance(loss, str):
            raise UsageError(f"{where['pref_loss']}: pref_loss takes one loss name, got {loss!r}; qlora maps "
                             f"{', '.join(_PREF_LOSSES)}.")
        if loss == "orpo":
            raise UsageError(f"{where['pref_loss']}: LLaMA-Factory's orpo adds each chosen answer's NLL averaged over "
                             "its own tokens; qlora's --method orpo is the ORPO paper's and TRL's (NLL over all chosen "
                             "tokens, prompt included). Write method: orpo (and drop stage, pref_loss) to train that.")
        if loss not in _PREF_LOSSES:
            raise UsageError(f"{where['pref_loss']}: pref_loss {loss!r} has no qlora counterpart; qlora maps "
                             f"{', '.join(_PREF_LOSSES)} (TRL removed kto_pair: KTO learns from unpaired data).")
        if loss == "simpo" and loaded.get("dpo_label_smoothing"):
            raise UsageError(f"{where['pref_loss']}: LLaMA-Factory's simpo loss ignores dpo_label_smoothing, which "
                             "qlora's (TRL's) SimPO would apply; drop dpo_label_smoothing, or write method: simpo and "
                             "label_smoothing to train with it.")
        method, loss_type = _PREF_LOSSES[loss]
        if loss_type:
            if "loss_type" in out:
                raise UsageError(f"{where['pref_loss']}: loss_type and pref_loss both set the loss; keep one.")
            out["loss_type"] = loss_type
            lines.setdefault("loss_type", lines.get("pref_loss", 0))
    if method is not None:
        if "method" in out:
            raise UsageError(f"{path} line {lines.get('method', '?')}: method and LLaMA-Factory's "
                             f"{' and '.join(sorted(keys & {'stage', 'pref_loss'}))} both set the method; keep one.")
        out["method"] = method
        lines.setdefault("method", lines.get("pref_loss", lines.get("stage", 0)))
    return out


def _pretrain_blocks(out: dict, lines: dict[str, int], path: Path) -> None:
    """LLaMA-Factory's stage pt packs by default (its ``packing`` is None, then true for pt): its texts are cut into
    blocks (:mod:`qlora.train.data.text_blocks`) in groups of ``preprocessing_batch_size`` texts, one set of groups
    per ``preprocessing_num_workers`` part. A ``packing: true`` written in the file also lowers ``cutoff_len`` by one
    before that (its DataArguments do it for any explicit packing), so the blocks are one token shorter."""
    if out.get("neat_packing"):
        raise UsageError(f"{path} line {lines.get('neat_packing', '?')}: neat_packing with stage pt; LLaMA-Factory "
                         "refuses it (\"`neat_packing` cannot be set as True except SFT\"): its pre-training blocks "
                         "let the texts attend to each other. Remove neat_packing.")
    out.pop("neat_packing", None)
    packing = out.pop("packing", None)
    if packing not in (None, True, False):
        raise UsageError(f"{path} line {lines.get('packing', '?')}: packing must be true or false, got {packing!r}.")
    batch = out.pop("preprocessing_batch_size", 1000)
    workers = out.pop("preprocessing_num_workers", None)
    if packing is False:
        return  # each text on its own
    for key, value in (("preprocessing_batch_size", batch), ("preprocessing_num_workers", workers)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{path} line {lines.get(key, '?')}: {key} must be a positive whole number, "
                             f"got {value!r}.")
    out["group_texts"], out["group_shards"] = batch, workers or 1
    lines.setdefault("group_texts", lines.get("preprocessing_batch_size", lines.get("stage", 0)))
    lines.setdefault("group_shards", lines.get("preprocessing_num_workers", lines.get("stage", 0)))
    seq_key = next((k for k in out if canonical_name(str(k)) == "seq_len"), None)
    if packing is True and seq_key is not None and isinstance(out[seq_key], int):
        out[seq_key] -= 1


def _sft_packing(out: dict, path: Path) -> None:
    """LLaMA-Factory's SFT packing: its DataArguments lower ``cutoff_len`` by one when packing is on, so examples
    are cut, and rows filled, to one token less; qlora's --seq-len is set to that. Its rows are filled by a greedy
    knapsack over each preprocessing batch where qlora fills them in a shuffled order, which changes which examples
    share a row but not what each is trained on under neat_packing (examples kept apart, as qlora's --packing).
    Without neat_packing its packed examples attend to each other; qlora keeps them apart, and says so."""
    seq_key = next((k for k in out if canonical_name(str(k)) == "seq_len"), None)
    if seq_key is not None and isinstance(out[seq_key], int):
        out[seq_key] -= 1
    if not out.get("neat_packing"):
        print(f"qlora train: {path}: packing without neat_packing lets LLaMA-Factory's packed examples attend to "
              "each other; qlora's packing keeps them apart (LLaMA-Factory's neat_packing), so each example trains "
              "as if alone.", file=sys.stderr)


def _llama_factory_defaults(out: dict, lines: dict[str, int], line: int) -> dict[str, Any]:
    """Fill ``out`` with :data:`_LLAMA_FACTORY_DEFAULTS` for the options it does not set (under any name);
    returns those filled in."""
    given = {canonical_name(str(k)): k for k in out} | {VALUE_ALIASES[str(k)][0]: k for k in out
                                                        if str(k) in VALUE_ALIASES}
    defaults = dict(_LLAMA_FACTORY_DEFAULTS)
    rank = out.get(given["rank"]) if "rank" in given else defaults["rank"]
    if isinstance(rank, int) and not isinstance(rank, bool):
        defaults["alpha"] = 2 * rank
    if "warmup_steps" not in given:
        defaults["warmup_ratio"] = 0.0
    if out.get("quantization_bit") is None:  # LLaMA-Factory quantizes only with quantization_bit: LoRA on 16 bits
        defaults["quant"] = "none"
    applied = {name: value for name, value in defaults.items() if name not in given}
    for name, value in applied.items():
        out[name] = value
        lines.setdefault(name, line)
    return applied


def _adapter_base(values: dict[str, Any]) -> None:
    """The base of a continued adapter: ``model: ADAPTER_FOLDER`` (or ``adapter:`` without ``model:``) continues
    that adapter on the base it names (as PEFT reads such a folder), and the 4-bit format it was trained on is the
    default."""
    from qlora.model.adapter_base import adapter_folder_base, trained_base

    base = adapter_folder_base(values["model"]) if values.get("model") else None
    if base is not None:
        if values.get("adapter"):
            raise UsageError(f"--model {values['model']} is a LoRA adapter and --adapter {values['adapter']} "
                             "another; give the base model as --model.")
        print(f"qlora train: {values['model']} is a LoRA adapter: training it further on its base {base}",
              file=sys.stderr)
        values["adapter"], values["model"] = values["model"], base
    elif not values.get("model") and values.get("adapter"):  # --adapter alone: the base its config names
        base = adapter_folder_base(values["adapter"])
        if base is not None:
            print(f"qlora train: no --model: training {values['adapter']} further on the base its "
                  f"adapter_config.json names, {base}", file=sys.stderr)
            values["model"] = base
    trained = trained_base(values["adapter"]) if values.get("adapter") else None
    if trained is None:
        return
    for key in ("quant", "blocksize", "double_quant"):
        if key in trained and key not in values:
            values[key] = trained[key]
        elif key in trained and values[key] != trained[key]:
            print(f"qlora train: warning: {values['adapter']} was trained with --{_flag(key)} {trained[key]}; "
                  f"continuing with {values[key]} changes the base weights it corrects", file=sys.stderr)


def _cosine_floor(values: dict[str, Any], ratio: Any, where: str) -> None:
    """axolotl's ``cosine_min_lr_ratio`` with its ``lr_scheduler: cosine`` is transformers' cosine_with_min_lr with
    ``min_lr_rate`` (the same formula: warmup, then cosine from 1 down to the ratio)."""
    schedule = values.get("lr_scheduler", "constant")
    if schedule != "cosine":
        raise UsageError(f"{where}: cosine_min_lr_ratio (axolotl) sets the floor of lr_scheduler: cosine; this config's "
                         f"schedule is {schedule}. Drop it, or use lr_scheduler: cosine.")
    kwargs = parse_schedule_kwargs(values.get("lr_scheduler_kwargs"))
    if {"min_lr", "min_lr_rate"} & set(kwargs):
        raise UsageError(f"{where}: cosine_min_lr_ratio and lr_scheduler_kwargs both set the cosine's floor; keep one.")
    values["lr_scheduler"] = "cosine_with_min_lr"
    values["lr_scheduler_kwargs"] = json.dumps(kwargs | {"min_lr_rate": ratio})


def load_config(yaml_path: str | Path | None, overrides: dict[str, Any], check_paths: bool = False,
                origin: dict[str, str] | None = None) -> TrainConfig:
    """Build a config from an optional YAML file, then ``overrides`` (flags win).

    Args:
        yaml_path: a mapping of option names (``-`` or ``_``) to values.
        overrides: option name -> value given on the command line.
        check_paths: also refuse a ``model`` that can only be a local path and is not there, or a local folder or
            file that holds no model (``qlora train``, before its imports; a config read elsewhere may name another
            machine's paths).
        origin: filled with option -> the file, line and key that set it, for :func:`at_line` to name in the
            refusals of later checks (the data's, the model's).

    Raises:
        UsageError: unreadable YAML, an unknown key (with close matches), a
            value of the wrong type, or an invalid combination.
    """
    by_name = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    origin = {} if origin is None else origin
    if yaml_path is not None:
        path = Path(yaml_path)
        if not str(yaml_path).strip():  # Path("") is the working folder
            raise UsageError("the config file's path is empty (an unset shell variable?); give the YAML file of "
                             "options (qlora train CONFIG.yaml), or leave it out and give the options as flags.")
        if path.is_dir():
            raise UsageError(f"config file {yaml_path} is a folder; give the YAML file of options (qlora train "
                             "CONFIG.yaml).")
        data_suffix = next((x for x in (suffix.lower() for suffix in path.suffixes[-2:]) if x in LOCAL_SUFFIXES), None)
        if data_suffix not in (None, ".json"):  # a JSON file may be options (LLaMA-Factory reads those too)
            raise UsageError(f"config file {yaml_path} is a {data_suffix} data file, not a YAML file of options: "
                             f"give the data with --data {yaml_path} (qlora train --model M --data FILE --output DIR).")
        if not path.is_file():
            raise UsageError(f"config file {yaml_path!r} does not exist; check the path of the YAML file.")
        loaded, lines = _read_yaml(path)
        if is_torchtune(loaded):
            loaded = torchtune_options(loaded, lines, path, frozenset(k.replace("-", "_") for k in overrides))
        axolotl = is_axolotl(loaded)
        trl = not axolotl and "stage" not in loaded and is_trl(loaded)
        if trl:
            loaded = trl_options(loaded, lines, path)
        loaded = jinja_template_keys(loss_keys(loaded, lines, path), lines, path)
        loaded = _llama_factory(loaded, lines, path, frozenset(k.replace("-", "_") for k in overrides))
        loaded = adapter_keys(peft_option_keys(loaded, lines, path), lines, path)
        given_as: dict[str, str] = {}
        passed_over = []
        for key, value in loaded.items():
            if value is None:
                continue  # an empty key keeps the default (axolotl's example files list many)
            where = f"{path} line {lines.get(str(key), '?')}"
            foreign = translate(str(key), value, where)
            if foreign is not None:
                pairs, note = foreign
                if note:
                    print(f"qlora train: {note}", file=sys.stderr)
                if not pairs and str(key) not in READ_WITH_DEFAULTS:
                    passed_over.append(str(key))
            for their_key, value in [(str(key), value)] if foreign is None else pairs:
                name = canonical_name(their_key)
                if name == "cosine_min_lr_ratio":
                    continue  # axolotl's, read below with the schedule it changes
                if name in VALUE_ALIASES:
                    name, mapping = VALUE_ALIASES[name]
                    if not (isinstance(value, bool) or isinstance(value, str) and value in mapping):
                        raise UsageError(f"{where}: {key} expects {' or '.join(map(str, mapping)).lower()} (it "
                                         f"sets qlora's {name}); got {value!r}")
                    value = mapping[value]
                    if value is None:
                        continue
                if name == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
                    name = "warmup_ratio"  # transformers 5 reads a warmup_steps below 1 as a share of the steps
                if name == "max_steps" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
                    value = 0  # TrainingArguments' -1, which TRL, LLaMA-Factory and axolotl files write: by epochs
                if name not in by_name:
                    raise _unknown(str(key), list(by_name), where)
                if name in given_as:
                    raise UsageError(f"{where}: {key} and {given_as[name]} both set {name}; keep one.")
                given_as[name] = str(key)
                origin[name] = f"{where} ({key})"
                values[name] = _coerce(name, value, field_type(by_name[name]), where)
        if passed_over:
            print(f"qlora train: {path}: passing over {', '.join(passed_over)}: settings of another tool that change "
                  "nothing in what qlora computes", file=sys.stderr)
        if axolotl:
            silent_defaults(values, AXOLOTL_DEFAULTS, path, "an axolotl")
        if "cosine_min_lr_ratio" in loaded:
            _cosine_floor(values, loaded["cosine_min_lr_ratio"], f"{path} line {lines['cosine_min_lr_ratio']}")
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise _unknown(key, [_flag(n) for n in by_name], "command line")
        if isinstance(value, str) and not value.strip() and by_name[name].default != "" and name not in _BLANK_OK:
            raise UsageError(f"--{_flag(name)} is empty (an unset shell variable?); give it a value, or leave the "
                             "option out. qlora train --help describes it.")
        values[name] = _coerce(name, value, field_type(by_name[name]), "command line")
        origin.pop(name, None)
    if yaml_path is not None and trl:
        asked = preference_keys(loaded)
        if asked and values.get("method", "sft") == "sft":
            raise UsageError(f"{path} line {lines.get(asked[0], '?')}: {', '.join(asked)}: keys of TRL's preference "
                             "trainers (trl dpo, the handbook's dpo.py or orpo.py run this file); say which: "
                             "method: dpo (or orpo, cpo, kto) in the file, or qlora train --method dpo.")
        trl_defaults(values, path, {str(k) for k in loaded}, {k.replace('-', '_') for k in overrides})
    if values.get("target_parameters") and "dropout" not in values:
        values["dropout"] = 0.0  # PEFT's expert LoRA has no dropout, so an adapter with it has none anywhere
    _adapter_base(values)
    config = TrainConfig(**values)
    try:
        config.validate()
        if check_paths:  # last: a run's other options are named first, then what --model holds
            check_model_path(config.model)
    except UsageError as exc:
        raise at_line(exc, origin) from None
    return config


def at_line(exc: UsageError, origin: dict[str, str]) -> UsageError:
    """A refusal of ``--option`` that the YAML file set, named by its file, line and key (``origin`` from
    :func:`load_config`)."""
    match = re.match(r"--([a-z0-9-]+)", str(exc))
    name = match.group(1).replace("-", "_") if match else ""
    return UsageError(f"{origin[name]}: {exc}") if name in origin else exc
