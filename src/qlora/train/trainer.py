"""The QLoRA training loop as one class, readable top to bottom.

``Trainer(config).run()`` does: setup (output folder, model, adapter, data,
optimizer, schedule, resume) -> train (accumulate, clip, step, log, evaluate,
checkpoint) -> save the final adapter -> cleanup. Choices that matter:

- The loss of one optimizer step is ``sum of token losses / trainable tokens``
  over *all* its micro-batches, so ``batch 4 x accum 1 == batch 1 x accum 4``
  with variable-length examples.
- Steps are epoch-aligned, as in transformers' Trainer: an epoch of ``N`` units
  has ``ceil(N / (B x GA x ranks))`` steps, the last one short (fewer, or a
  short last, micro-batch), and a run ``ceil(epochs x steps per epoch)`` (see
  :func:`steps_per_epoch`). No step crosses an epoch's end, so an epoch trains
  each unit exactly once.
- The data stream is a pure function of (seed, step): step ``s`` is step ``k``
  of epoch ``e`` (``divmod(s, steps per epoch)``) and takes units
  ``k*G .. min((k+1)*G, N) - 1`` (``G = B x GA x ranks``) of epoch ``e``'s
  order (:func:`shuffled_indices`), cut into global micro-batches of
  ``B x ranks`` units. A checkpoint therefore only needs the step.
- A checkpoint holds the adapter, optimizer, scheduler, RNG states (torch,
  CUDA, python, numpy) and the step, written atomically; resuming reproduces
  the losses of an uninterrupted run bit for bit on the CPU.
- Under ``torchrun`` (see :mod:`qlora.train.distributed`) each step's units
  are split over the ranks, rank ``r`` taking its ``B`` units of every global
  micro-batch, and the token count is all-reduced; the global batch, the
  losses and the checkpoints are those of one process with ``B x ranks``.
  A rank left without a unit by a short micro-batch runs a stand-in that
  counts nothing (:meth:`Trainer._stand_in`): every rank joins every collective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import random
import shutil
import shlex
import signal
import time
from bisect import bisect_left
from contextlib import nullcontext
from dataclasses import replace
from itertools import count
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from qlora.atomic import atomic_dir, clear_leftovers
from qlora.cpu_threads import apply_cpu_threads
from qlora.errors import UsageError
from qlora.float_dtype import float_dtype
from qlora.model.chat_format import ChatFormat, today
from qlora.model.position_limit import check_positions, longest_positions
from qlora.model.quantize import non_text_names
from qlora.nn import Experts4bit, expert_weight_names
from qlora.optim import create_optimizer, decay_groups, lora_plus_param_groups, make_scheduler
from qlora.output_folder import check_output, clear_owned, record, staged_output
from qlora.train.checkpoint_damage import ADAPTER_WEIGHTS, STATE_FILE, checkpoint_damage, damaged_checkpoint_message
from qlora.train.config import TrainConfig, parse_pattern, parse_schedule_kwargs, target_module_names
from qlora.train.distributed import (DistContext, RankLost, all_reduce_grads, gathered_parameters, is_rank_lost,
                                     shard_fsdp, wrap_ddp)
from qlora.train.data import (
    IGNORE_INDEX, attention_windows, check_packing_supported, count_trainable_tokens, example_positions, fallback_note,
    normalize, own_template, pack_examples, packed_collate, pad_collate, pad_token_id, resolve_chat_format,
    shuffled_indices, tokenize_dataset,
)
from qlora.train.data.dedupe import drop_duplicates
from qlora.train.data.image_packing import check_image_packing, image_blocks_of, multimodal_positions
from qlora.chat.prefix_lm import packed_windows, prefix_type
from qlora.chat.prefix_suffix import image_row_tokenizer
from qlora.train.data.selection import check_split_of_files, hold_out, read_sources, source_names
from qlora.train.data.text_blocks import text_blocks
from qlora.train.data.tokenized_dataset import DataReport, NothingToTrain
from qlora.train.file_fingerprint import changed_file, model_fingerprints
from qlora.train.log_window import window_record
from qlora.train.loss import chunked_loss_matches, model_inputs, token_loss_sum
from qlora.train.metrics import MetricsLogger, NullMetrics, gpu_memory_gib
from qlora.train.neftune import add_neftune
from qlora.train.run_identity import as_used, ignored
from qlora.train.strategy import Cadence

CHECKPOINTS = "checkpoints"
# What a run writes at the top of --output besides the final adapter and tokenizer files,
# all recorded in the folder's manifest so --overwrite removes them and nothing else.
RUN_ENTRIES = (CHECKPOINTS, "config.yaml", "metrics.jsonl", "events", "loss.png",
               "adapter_config.json", "adapter_model.safetensors", "qlora_adapter.json")
LOFTQ_BASE = "loftq-base"  # only --init loftq writes it: a user's folder of that name is not recorded as qlora's
# Options a checkpoint from before qlora bounded images lacks: resumed unbounded-before, bounded-after (a warning).
_PIXEL_KEYS = ("image_max_pixels", "image_min_pixels", "image_resize")
# Options that set the run's length: --resume may change them where the steps trained so far stay the same.
_LENGTH = ("epochs", "max_steps")
# Names save_pretrained may give tokenizer files: a user's file of such a name is refused up front.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")


def _counted(n: int, noun: str) -> str:
    """``1 example``, ``2 examples``: the run log's counts."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _continue_command(out: Path, checkpoint: Path, adapter: Path | None = None) -> str:
    """The command that continues the run's adapter (``adapter``, else the final one, else the checkpoint's) into a
    new folder beside ``out``."""
    adapter = adapter or (out if (out / "adapter_config.json").is_file() else checkpoint / "adapter")
    new = next(p for p in (out.with_name(f"{out.name}-continued" + (f"-{n}" if n > 1 else "")) for n in count(1))
               if not p.exists())
    return f"qlora train --adapter {shlex.quote(str(adapter))} --output {shlex.quote(str(new))}"


def _no_checkpoint(out: Path) -> str:
    """The refusal of a resume into a folder that holds no qlora checkpoint but is not empty: one of a run's
    checkpoints given as --output, a transformers Trainer's output, an adapter alone (a PEFT folder, a run that saved
    no checkpoint), checkpoints whose state file was deleted, or a run that stopped before its first checkpoint. Only
    the last may start again with --overwrite: the others say how to go on without losing their adapter."""
    if (out / STATE_FILE).is_file() and out.parent.name == CHECKPOINTS:
        run = out.parent.parent
        return (f"--resume: {out} is one of the checkpoints of the run in {run}; give the run's folder, --output "
                f"{shlex.quote(str(run))}, and --resume continues it from its last checkpoint.")
    trainer_checkpoints = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdecimal()),
                                 key=lambda p: int(p.name[11:]))
    if (out / "trainer_state.json").is_file() or trainer_checkpoints:
        adapters = [p for p in [out, *trainer_checkpoints] if (p / "adapter_config.json").is_file()]
        go_on = ("; to train its adapter further, continue it in a new run: "
                 f"{_continue_command(out, out, adapters[-1])} with the data and the steps to add (a fresh optimizer "
                 "and schedule)" if adapters else "")
        return (f"--resume: {out} holds a transformers Trainer's output, not a qlora run: qlora resumes from its own "
                f"checkpoints only (their optimizer, schedule and data order are qlora's){go_on}.")
    if (out / "adapter_config.json").is_file():
        return (f"--resume: {out} holds an adapter but no qlora checkpoint (the optimizer state, schedule and step "
                "a resume continues from: its run saved none, with --save-strategy no, they were deleted, or the "
                f"adapter was saved by PEFT), so there is no run to continue; to train the adapter further, continue "
                f"it in a new run: {_continue_command(out, out)} with the data and the steps to add (a fresh "
                "optimizer and schedule).")
    stateless = sorted((p.parent for p in (out / CHECKPOINTS).glob("step-*/adapter/adapter_config.json")
                        if p.parent.parent.name[5:].isdecimal()), key=lambda p: int(p.parent.name[5:]))
    if stateless:  # their trainer_state.pt deleted, as to save space once a run is done
        return (f"--resume: the checkpoints of {out} hold adapters but not the {STATE_FILE} a resume continues from "
                "(the optimizer state, schedule and step), so there is no run to continue; to train the newest "
                f"one's adapter further, continue it in a new run: {_continue_command(out, out, stateless[-1])} with "
                "the data and the steps to add (a fresh optimizer and schedule).")
    return (f"--resume: {out} has no checkpoint to resume from (its run stopped before its first checkpoint, or "
            "saved none: --save-strategy no); start the run again with --overwrite instead of --resume.")


def _train_further(out: Path, checkpoint: Path, differ: list[str]) -> str:
    """For a resume asked to run longer: the command that continues the run's adapter into a new folder."""
    if not {"epochs", "max_steps", "max_steps_per_epoch"} & set(differ):
        return ""
    return (f". To train further, continue its adapter in a new run: {_continue_command(out, checkpoint)}"
            " with the data and the steps or epochs to add (the adapter names its base model and brings its rank, "
            "targets and chat format; the optimizer state and the schedule start afresh)")


def _changed_files(out: Path, checkpoint: Path, saved: dict, current: dict) -> None:
    """Refuse a resume whose data, model or starting adapter changed under the same path since the checkpoint (a
    checkpoint from before fingerprints, or of an option it did not fingerprint, is not compared).

    Raises:
        UsageError: naming the first changed file and its option.
    """
    for option, files in current.items():
        change = changed_file(saved[option], files) if option in saved else None
        if change is None:
            continue
        name, how = change
        what = "data" if option.endswith("data") else "weights"
        raise UsageError(f"--resume: {name} ({option}) {how} since {checkpoint} was written, so the rest of the run "
                         f"would train on other {what} than its start. Put the file back as it was to resume, or "
                         f"continue the run's adapter in a new run on the {option} as it is now: "
                         f"{_continue_command(out, checkpoint)} with the run's other options (a fresh optimizer and "
                         "schedule).")


def _experts_hint(saved: dict, differ: list[str]) -> str:
    """For a resume refused on ``quantize_experts``: how to load the base as the checkpoint trained on it. A
    checkpoint older than the option quantized its experts, and an axolotl 4-bit file silent on
    ``quantize_moe_experts`` now keeps them 16-bit."""
    if "quantize_experts" not in differ:
        return ""
    if saved.get("quantize_experts", True):
        return (". The checkpoint's base has 4-bit MoE experts: to resume with them, add quantize_moe_experts: true "
                "to the config file (quantize_experts: true in a qlora one) or pass --quantize-experts")
    return (". The checkpoint's base keeps its MoE experts 16-bit: to resume with them, set quantize_moe_experts: "
            "false in the config file (quantize_experts: false in a qlora one) or pass --no-quantize-experts")


def _global_batch_hint(saved: dict, differ: list[str], config: TrainConfig, world: int) -> str:
    """For a resume refused on ``global_batch``: what makes it up, and the options that resume with this many
    processes (checkpoints do not depend on the number of processes, only on the global batch)."""
    if "global_batch" not in differ:
        return ""
    want = saved["global_batch"]
    now = (f". The global batch is --batch-size x --grad-accum x processes ({config.batch_size} x "
           f"{config.grad_accum} x {world} here)")
    if want % world:
        return f"{now}; {want} is not a multiple of {world}: resume with a number of processes that divides it"
    per_rank = want // world
    batch = math.gcd(per_rank, config.batch_size)
    return (f"{now}: with {world} process{'es' if world > 1 else ''}, resume with --batch-size {batch} "
            f"--grad-accum {per_rank // batch}")


class Interrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the checkpoint is safely written."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint}. "
                         "Continue with the same command and --resume.")
        self.step, self.checkpoint = step, checkpoint


def _make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]]):
    """The optimizer named by ``--optim`` (qlora's AdamW family, paged or not) with the run's hyperparameters."""
    try:
        return create_optimizer(cfg.optim, params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    except ValueError as exc:
        raise UsageError(f"--optim {cfg.optim}: {exc}") from exc


def _check_training_fits(cfg: TrainConfig, params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> None:
    """Refuse a run whose gradients and AdamW moments cannot fit in what the CPU has left once the model and its
    adapters are made: Linux would kill the run at its first step, with no message (:mod:`qlora.cpu_memory`)."""
    from qlora.cpu_memory import available_bytes

    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    if not tensors or tensors[0].device.type != "cpu":
        return
    moments = 2 if "8bit" in cfg.optim else 8  # two moments a parameter, of 1 byte or 4
    need = sum(t.numel() * (t.element_size() + moments) for t in tensors)
    available = available_bytes()
    if available is not None and need > available:
        count = sum(t.numel() for t in tensors)
        raise UsageError(f"--rank {cfg.rank}: training the {count:,} adapter parameters needs {need / 2**30:.1f} GiB "
                         f"more on the CPU (their gradients and the --optim {cfg.optim} moments), and "
                         f"{available / 2**30:.1f} GiB are available. Lower --rank, adapt fewer layers "
                         "(--target-modules), or use an 8-bit optimizer (--optim adamw_8bit).")


def _make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """--lr-scheduler over ``total`` steps; warmup: --warmup-steps, else --warmup-ratio of the steps rounded up
    (transformers' ``get_warmup_steps``)."""
    warmup = cfg.warmup_steps or math.ceil(total * cfg.warmup_ratio)
    kwargs = parse_schedule_kwargs(cfg.lr_scheduler_kwargs)
    if cfg.lr_scheduler == "warmup_stable_decay":  # the phases must fit, or decay would begin inside warmup
        phases = {"warmup": warmup, "stable": kwargs.get("num_stable_steps") or 0, "decay": kwargs["num_decay_steps"]}
        if sum(phases.values()) > total:
            shown = " + ".join(f"{n} {k}" for k, n in phases.items() if n)
            raise UsageError(f"--lr-scheduler warmup_stable_decay: its phases ({shown} steps) exceed the run's "
                             f"{total} steps; lower num_decay_steps in --lr-scheduler-kwargs or train longer.")
    try:
        return make_scheduler(cfg.lr_scheduler, optimizer, warmup, total, kwargs)
    except ValueError as exc:
        raise UsageError(f"--lr-scheduler-kwargs: {exc}.") from None


def steps_per_epoch(units: int, global_batch: int, cap: int = 0) -> int:
    """Optimizer steps of one epoch: transformers' ``ceil(ceil(units / micro-batch) / accumulation)``, which is
    ``ceil(units / (batch x accumulation x ranks))``, the last step taking what is left of the epoch; at most
    ``cap`` (``--max-steps-per-epoch``; 0: no cap)."""
    steps = max(1, math.ceil(units / global_batch))
    return min(steps, cap) if cap else steps


def total_steps(units: int, global_batch: int, epochs: float, max_steps: int = 0, cap: int = 0) -> int:
    """The run's optimizer steps: ``max_steps`` if set, else transformers' ``ceil(epochs x steps per epoch)``
    (fractional epochs too; ``cap``: the steps of an epoch at most)."""
    return max_steps or max(1, math.ceil(epochs * steps_per_epoch(units, global_batch, cap)))


def compute_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA when supported (fp16 otherwise), fp32 on the CPU unless asked."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return float_dtype(precision, "--precision")


def first_nonfinite_module(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> str | None:
    """Re-run ``batch`` with forward hooks and name the first module whose output is not finite."""
    found: list[str] = []

    def hook(name: str):
        def check(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not found and torch.is_tensor(out) and out.is_floating_point() and not torch.isfinite(out).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**model_inputs(batch, model), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: the ``step-N`` folders holding a state file (a copy a user made
    beside them, ``step-N.bak``, is none: neither resumed from nor rotated away). One a save killed between its two
    renames set aside (``.step-N.old-PID``, no ``step-N``) is put back first, so that a resume finds it at once."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    clear_leftovers(root)
    return sorted((p for p in root.glob("step-*") if p.name[5:].isdecimal() and (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name[5:]))


class Trainer:
    """One QLoRA fine-tuning run, configured by a :class:`TrainConfig`."""

    def __new__(cls, config: TrainConfig) -> "Trainer":
        """``Trainer(config)`` is the trainer of ``config.method``: preference methods have their own."""
        if cls is Trainer and config.method == "kto":
            from qlora.train.kto_trainer import KTOTrainer

            cls = KTOTrainer
        elif cls is Trainer and config.method != "sft":
            from qlora.train.preference_trainer import PreferenceTrainer

            cls = PreferenceTrainer
        return super().__new__(cls)

    def __init__(self, config: TrainConfig) -> None:
        config.validate()  # as load_config does: a config built in Python is checked as `qlora train` checks one
        self.config = config
        self.out = Path(config.output)
        self.dist = DistContext.from_env()
        if not self.dist.is_main:  # every rank would say the same: rank 0 alone warns, as it alone logs
            logging.getLogger("qlora").setLevel(logging.ERROR)
        self.device = self.dist.device()
        self.dtype = compute_dtype_for(config.precision, self.device)
        self.step = 0
        self.losses: list[float] = []
        self.adapter_hooks = None  # adapter-specific work around each step (AdaLoRA: penalty, rank allocation)
        self._saved_step: int | None = None  # step of the newest checkpoint (the same on every rank)
        self._saved_records: int | None = None  # metrics.jsonl records written when the resumed checkpoint was
        self._log_window: list[dict[str, Any]] = []  # step records since the last metrics record (--logging-steps)
        self._input_grads = False  # the input embeddings' output requires grad (see _loss_reaching_adapters)
        self._graph_checked = False  # the first loss of this process was checked for a graph that reaches adapters
        self._decay_all = False  # resumed from a checkpoint whose optimizer decays biases and norm weights too
        self._length_change: tuple[dict[str, Any], list[str]] | None = None  # resumed with another --max-steps/--epochs

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the output folder, then load model, adapter, data, optimizer; resume if asked."""
        cfg = self.config
        resume_from = self._check_output()
        # Its files fingerprinted now, before they are read: the checkpoints record what this run reads.
        self.run_config = self._run_config()
        # Read (and so check) the data before the model: a bad file fails in seconds, not after the load.
        # LLaMA-Factory's num_samples draws come from one generator seeded with the run's seed, train then eval
        # datasets, so a rerun or a resume reads the same rows.
        self.sample_rng = np.random.RandomState(cfg.seed)
        check_split_of_files(cfg.data, cfg.data_split, cfg.data_subset, cfg.dataset_dir,
                             ("--data-split", "--data-subset"), "train")
        train_examples = self._read_data(cfg.data, cfg.data_split)
        if cfg.eval_data:  # --data's subset, unless --eval-data-subset names one: not asked of --eval-data's files
            check_split_of_files(cfg.eval_data, cfg.eval_data_split, cfg.eval_data_subset, cfg.dataset_dir,
                                 ("--eval-data-split", "--eval-data-subset"), "test")
        eval_examples = (self._read_data(cfg.eval_data, cfg.eval_data_split, "--eval-data-split") if cfg.eval_data
                         else None)
        eval_ends = list(self._source_ends) if cfg.eval_data and cfg.method == "sft" else []
        if cfg.eval_split:
            train_examples, eval_examples = self._hold_out(train_examples)
        if cfg.batch_size > len(train_examples):  # every step would be the whole data in one short micro-batch
            raise UsageError(f"--batch-size {cfg.batch_size} is more than the {len(train_examples)} examples of "
                             f"{cfg.data}; lower --batch-size (--grad-accum gives a larger effective batch).")
        self._load_model()
        self._check_loaded_revision(resume_from)
        self.chat_format = self._chat_format(resume_from)
        # a model without a chat template: say which built-in format chat data are rendered in
        self.template_fallback = (cfg.template == "auto" and own_template(self.tokenizer) is None
                                  and any(e.conversational for e in train_examples))  # DPO's/KTO's rows too
        self.seen_rows: set[tuple] = set()  # --dedupe: the examples kept so far
        self.duplicates = 0
        self.train_units, self.report = self._tokenize(train_examples)
        if getattr(self.report, "thinking_mode", None):  # inference prompts in the mode the answers trained in
            kwargs = {**self.chat_format.template_kwargs, **self.report.thinking_mode}
            self.chat_format = replace(self.chat_format, template_kwargs=kwargs)
        self._check_batch_fits(len(train_examples))
        if not cfg.eval_split and cfg.method == "sft":  # axolotl's SFT test_datasets are deduplicated on their own
            self.seen_rows = set()
        self.eval_report = None  # what tokenizing the held-out examples cut or skipped
        self.eval_units = self._tokenize_eval(eval_examples) if eval_examples else []
        self.eval_parts = self._eval_parts(eval_ends)
        check_positions(self.model, max(self._positions(self.train_units), self._positions(self.eval_units)),
                        cfg.model)
        self.dist.barrier()  # every rank has checked --output before rank 0 changes it
        if cfg.overwrite and not cfg.resume and self.out.exists() and self.dist.is_main:
            clear_owned(self.out)  # only now: every input has been checked; only qlora's own files go
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world_size
        self.steps_per_epoch = steps_per_epoch(len(self.train_units), self.global_batch, cfg.max_steps_per_epoch)
        self.total_steps = total_steps(len(self.train_units), self.global_batch, cfg.epochs, cfg.max_steps,
                                       cfg.max_steps_per_epoch)
        planned = self._check_length(resume_from) if self._length_change else self.total_steps
        if cfg.adalora:
            self._add_adalora()
        if cfg.fused_kernels:  # shares every parameter and adapter, so it may follow their creation
            from qlora.model.fused import apply_fused_kernels

            apply_fused_kernels(self.model)
        # The chunked loss calls the decoder directly, which would bypass the hooks of the
        # wrapped root module (DDP's gradient sync, FSDP's unsharding of the embeddings).
        self.chunked_ce = (cfg.chunked_ce and not self.dist.enabled
                           and chunked_loss_matches(self.model, self.micro_batches(0)[0]))
        self._prepare_method()
        if cfg.neftune_alpha:
            add_neftune(self.model, cfg.neftune_alpha)
        self._parallelize()  # after every adapter exists: DDP and FSDP see the final parameters
        params = self._param_groups()
        _check_training_fits(cfg, params)
        self.optimizer = _make_optimizer(cfg, params)
        self.scheduler = _make_scheduler(cfg, self.optimizer, self.total_steps)
        self.on_plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # steps on eval loss
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        if resume_from is not None:
            self._load_checkpoint(resume_from)
        if not self.dist.is_main:
            self.metrics = NullMetrics()
            return
        self.out.mkdir(parents=True, exist_ok=True)
        record(self.out, *self._run_entries())
        self._write_config()
        self.metrics = MetricsLogger(self.out, self.total_steps, self.step, cfg.progress, self._saved_records)
        if self.template_fallback:
            self.metrics.write(fallback_note(self.tokenizer))
        if self.dense_experts:
            dtype = str(self.dtype).removeprefix("torch.")
            self.metrics.write(f"--quantize-experts false: {self.dense_experts} MoE experts modules keep their 3-D "
                               f"weights in {dtype} on the 4-bit base, as bitsandbytes under transformers (and "
                               "axolotl without quantize_moe_experts) keeps them; true quantizes them too, about a "
                               "quarter of their memory")
        unit = "packed row" if cfg.packing else "block" if cfg.group_texts else "example"
        self.metrics.write(f"data: {self.report.summary()}; {_counted(len(self.train_units), unit)}, "
                           f"{_counted(self.total_steps, 'step')}"
                           + (f"; {_counted(len(eval_examples), 'example')} held out for eval" if cfg.eval_split
                              else "")
                           + (f"; {_counted(self.duplicates, 'duplicate example')} dropped (--dedupe)" if cfg.dedupe
                              else ""))
        if isinstance(self.eval_report, DataReport) and self.eval_report.cut_or_skipped():  # less is scored than held
            self.metrics.write(f"eval data: {self.eval_report.summary()}; {_counted(len(self.eval_units), unit)} "
                               "evaluated")
        if cfg.eval_steps and not self.eval_units:  # auto's (steps and epoch without eval data are refused)
            self.metrics.write(f"--eval-steps {cfg.eval_steps:g}: no held-out data, so nothing is evaluated; give "
                               "--eval-data or --eval-split to evaluate")
        if resume_from is not None:  # said also without a progress bar, whose start would show it
            self.metrics.write(f"resuming from {resume_from} at step {self.step}" + (
                f", for {self.total_steps} steps instead of the {planned} it was planned for" if planned
                != self.total_steps else ""))

    def _param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the trained parameters (LoRA+: A's and B's groups), each split into
        the decayed ones and the biases and norm weights that weight decay leaves alone, as transformers does
        (:mod:`qlora.optim.weight_decay`). A run resumed from a checkpoint written before that split decays them
        all, as it began."""
        cfg = self.config
        if cfg.lora_plus_ratio:
            groups = lora_plus_param_groups(self.model, cfg.lr, cfg.lora_plus_ratio, cfg.weight_decay)
        else:
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        split = decay_groups(self.model, groups, cfg.weight_decay)
        if split is groups or not self._decay_all:
            return split
        logging.getLogger("qlora").warning(
            "qlora: the checkpoint was written by an older qlora, which decayed every trained parameter; the run "
            "continues so (transformers, and runs started now, leave biases and norm weights undecayed).")
        return groups

    def _check_batch_fits(self, examples: int) -> None:
        """A global micro-batch (batch x ranks) larger than the units is refused: every step would be the whole
        data in one short micro-batch, some ranks running stand-ins only, the same run as with a smaller
        --batch-size at more cost. There may be fewer units than examples (packed rows, text blocks, examples
        left with no trained token) and more ranks than one."""
        cfg, units, world = self.config, len(self.train_units), self.dist.world_size
        if cfg.batch_size * world <= units:
            return
        batch = f"--batch-size {cfg.batch_size}" + (f" x {world} ranks" if world > 1 else "")
        lower = "lower --batch-size" + (" or --nproc" if world > 1 else "")
        if cfg.group_texts:
            raise UsageError(f"{batch} is more than the {units} blocks of --seq-len {cfg.seq_len} tokens that the "
                             f"texts of {cfg.data} make; {lower} or --seq-len (cutoff_len).")
        if cfg.packing:
            raise UsageError(f"{batch} is more than the {units} packed rows (of --seq-len {cfg.seq_len} tokens) "
                             f"that --packing makes of the {examples} examples of {cfg.data}; {lower} or --seq-len, "
                             "or train without --packing (--grad-accum gives a larger effective batch).")
        raise UsageError(f"{batch} is more than the {units} examples of {cfg.data} left to train on; {lower} "
                         "(--grad-accum gives a larger effective batch).")

    def _check_output(self) -> Path | None:
        cfg = self.config
        if cfg.resume:
            checkpoints = list_checkpoints(self.out)
            if not checkpoints:
                if not self.out.exists() or self.out.is_dir() and not any(self.out.iterdir()):
                    state = "does not exist" if not self.out.exists() else "is an empty folder"
                    raise UsageError(f"--resume: {self.out} {state}, so there is no run to resume; check "
                                     "--output, or leave out --resume to start the run.")
                raise UsageError(_no_checkpoint(self.out))
            damage = checkpoint_damage(checkpoints[-1])
            if damage:
                raise UsageError(damaged_checkpoint_message(self.out, checkpoints, damage))
            saved = json.loads((checkpoints[-1] / "run_config.json").read_text())
            current = self._run_config()
            # A key the checkpoint lacks was added to qlora after it was written: that run used the default. The
            # pixel bounds are the exception: LLaMA-Factory files set them where silent, and they touch only images.
            defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
            unbounded = [k for k in _PIXEL_KEYS if k not in saved and current[k] != defaults[k]]
            recorded = as_used({k: saved[k] if k in saved else defaults.get(k) for k in current}, self._auto_precision)
            skipped = {*unbounded, *ignored(recorded, current), "source_files"}
            differ = [k for k, v in current.items() if k not in skipped and recorded[k] != v]
            if differ and set(differ) <= set(_LENGTH):  # checked once the run's steps are known (_check_length)
                self._length_change = ({k: recorded[k] for k in _LENGTH}, differ)
            elif differ:
                # a key the checkpoint lacks shows the default its run used, not None
                was = {k: repr(recorded[k]) if k in saved else f"{recorded[k]!r} (the default then)" if k in defaults
                       else "not recorded" for k in differ}
                shown = ", ".join(f"{k}: {was[k]} -> {current[k]!r}" for k in differ)
                raise UsageError(f"--resume: the checkpoint in {self.out} was made with a different config ({shown}); "
                                 "resume with the original options or train into a new --output"
                                 + _experts_hint(saved, differ)
                                 + _global_batch_hint(saved, differ, cfg, self.dist.world_size)
                                 + _train_further(self.out, checkpoints[-1], differ))
            _changed_files(self.out, checkpoints[-1], saved.get("source_files", {}), current["source_files"])
            self._decay_all = not saved.get("no_decay_groups", False)
            if unbounded:
                logging.getLogger("qlora").warning(
                    "qlora: %s was written before qlora bounded images (%s); if this run trains on images, the "
                    "steps after it see them bounded where the steps before saw them as stored.", checkpoints[-1],
                    ", ".join(f"{k} {current[k]}" for k in unbounded))
            if "lr_scheduler_kwargs" not in saved:  # written before the schedules followed transformers
                logging.getLogger("qlora").warning(
                    "qlora: %s was written by an older qlora, whose warmup rose as (step+1)/(warmup+1) over "
                    "int(ratio x steps) steps; the run continues on transformers' schedule (step/warmup over "
                    "ceil(ratio x steps) steps), so its learning rates can differ slightly from before.",
                    checkpoints[-1])
            if "epoch_steps" not in saved:  # written when steps took a fixed number of units from a stream of epochs
                logging.getLogger("qlora").warning(
                    "qlora: %s was written by an older qlora, whose steps ran on across epochs' ends; the run "
                    "continues with epoch-aligned steps (each epoch ends with a short step), so the steps after it "
                    "see other examples, and --epochs can give another number of steps, than before.",
                    checkpoints[-1])
            return checkpoints[-1]
        check_output(self.out, overwrite=cfg.overwrite, writes=self._run_entries() + _TOKENIZER_FILES,
                     alternative="--resume to continue its run",
                     inputs={"--model": cfg.model, "--data": cfg.data, "--eval-data": cfg.eval_data})
        return None

    def _check_length(self, checkpoint: Path) -> int:
        """The steps the checkpoint's run was planned for. A resume asked for another length (--max-steps, --epochs)
        goes on where the run so far is the start of the run of that length, so that the resumed run is that run
        uninterrupted: the checkpoint's step is within it, and every step trained so far, and the next (whose rate
        the checkpoint's optimizer holds), has the same learning rate under the new length's schedule. AdaLoRA's
        rank schedule and reduce_lr_on_plateau (whose rates follow the evaluation at the end of the run) depend on
        the length all along.

        Raises:
            UsageError: naming the changed option and what the new length would change.
        """
        from qlora.optim import PLATEAU, lr_lambda, schedule_name

        cfg, (recorded, differ) = self.config, self._length_change
        done = int(checkpoint.name[5:])
        planned = total_steps(len(self.train_units), self.global_batch, recorded["epochs"], recorded["max_steps"],
                              cfg.max_steps_per_epoch)
        if self.total_steps == planned:  # another --epochs that rounds to the same steps
            return planned
        why = ""
        if self.total_steps < done:
            why = f"its checkpoint is at step {done}, past the {self.total_steps} steps asked for"
        elif cfg.adalora:
            why = "--adalora's rank schedule spans the run's steps"
        elif schedule_name(cfg.lr_scheduler) == PLATEAU:
            why = f"--lr-scheduler {PLATEAU} follows the evaluations, one of them at the end of the run"
        else:
            kwargs = parse_schedule_kwargs(cfg.lr_scheduler_kwargs)
            rates = [lr_lambda(cfg.lr_scheduler, cfg.warmup_steps or math.ceil(n * cfg.warmup_ratio), n, cfg.lr,
                               kwargs) for n in (planned, self.total_steps)]
            other = next((k for k in range(done + 1) if rates[0](k) != rates[1](k)), None)
            if other is not None:
                why = (f"--lr-scheduler {cfg.lr_scheduler} over {self.total_steps} steps instead of {planned} would "
                       f"have given step {other + 1} another learning rate ({rates[1](other) * cfg.lr:.4g} instead of "
                       f"{rates[0](other) * cfg.lr:.4g}), so the steps trained so far are not that run's")
        if why:
            shown = ", ".join(f"{k}: {recorded[k]!r} -> {getattr(cfg, k)!r}" for k in differ)
            raise UsageError(f"--resume: the run in {self.out} was planned for {planned} steps and is asked for "
                             f"{self.total_steps} ({shown}), but {why}. Resume with the original options"
                             + _train_further(self.out, checkpoint, differ))
        return planned

    @property
    def _auto_precision(self) -> str:
        """What --precision auto resolves to on this device."""
        dtype = compute_dtype_for("auto", self.device)
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]

    def _check_loaded_revision(self, resume_from: Path | None) -> None:
        """A hub model's revision as loaded: with a hub the load may have fetched a newer commit than the cache held
        when the run's files were fingerprinted. The checkpoints record it, and a resume is refused on another.

        Raises:
            UsageError: resuming a run on another revision than its checkpoint's.
        """
        if not self.config.model or Path(self.config.model).expanduser().exists():
            return  # a local model: its files were fingerprinted before the load read them
        loaded = model_fingerprints(self.config.model)
        recorded = self.run_config["source_files"]["--model"]
        if not any("revision" in f for f in loaded.values()) or loaded == recorded:
            return
        if resume_from is not None:
            saved = json.loads((resume_from / "run_config.json").read_text()).get("source_files", {})
            _changed_files(self.out, resume_from, {k: v for k, v in saved.items() if k == "--model"},
                           {"--model": loaded})
        self.run_config = {**self.run_config, "source_files": {**self.run_config["source_files"], "--model": loaded}}

    def _run_config(self) -> dict[str, Any]:
        """The run-defining options as this run uses them, and the fingerprints of the files it reads."""
        return as_used(self.config.run_defining(self.dist.world_size), self._auto_precision)

    def _load_model(self) -> None:
        from qlora.model.inject import add_lora
        from qlora.model.load import load_model
        from qlora.model.streamed_init import StreamedInit

        cfg = self.config
        targets = target_module_names(cfg.target_modules)
        parameters = [t.strip() for t in cfg.target_parameters.split(",") if t.strip()]
        if parameters and cfg.adalora:
            raise UsageError("--target-parameters works with LoRA, not --adalora (PEFT's AdaLoRA has no expert "
                             "weights either).")
        rank_pattern = parse_pattern("rank_pattern", cfg.rank_pattern)
        alpha_pattern = parse_pattern("alpha_pattern", cfg.alpha_pattern)
        # LoftQ/PiSSA/OLoRA on a 4-bit base: computed layer by layer as the 16-bit weights are read, never
        # the whole 16-bit model in memory (a 16-bit run keeps it anyway: add_lora computes them there)
        streamed = StreamedInit(cfg.init, r=cfg.rank, alpha=cfg.alpha, target_modules=targets, rslora=cfg.rslora,
                                rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, loftq_iter=cfg.loftq_iter,
                                seed=cfg.seed) if cfg.rewrites_base and cfg.quant != "none" else None
        self.model, self.tokenizer = load_model(cfg.model, quant=None if cfg.quant == "none" else cfg.quant,
                                                double_quant=cfg.double_quant, blocksize=cfg.blocksize,
                                                compute_dtype=self.dtype, device=self.device, weight_hook=streamed,
                                                quantize_experts=cfg.quantize_experts)
        self.dense_experts = 0 if cfg.quant == "none" else sum(
            1 for m in self.model.modules() if expert_weight_names(m) and not isinstance(m, Experts4bit))
        apply_cpu_threads(self.model, self.device)  # one thread for small models: see qlora.cpu_threads
        tokens = [t.strip() for t in cfg.add_special_tokens.split(",") if t.strip()]
        if tokens:
            from qlora.model.tokens import add_special_tokens

            torch.manual_seed(cfg.seed)  # the new rows are drawn (mean_resizing): by --seed, not by what ran before
            add_special_tokens(self.model, self.tokenizer, tokens)
        torch.manual_seed(cfg.seed)
        if cfg.adapter:
            from qlora.model.adapter_io import adapter_tokenizer, load_adapter

            self.tokenizer = adapter_tokenizer(cfg.adapter, self.tokenizer)  # with the tokens it may have added
            load_adapter(self.model, cfg.adapter, trainable=True)
        elif not cfg.adalora:
            add_lora(self.model, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets,
                     rslora=cfg.rslora, verbose=False, use_dora=cfg.dora, init=cfg.init, loftq_iter=cfg.loftq_iter,
                     loftq_quant=(cfg.quant, cfg.blocksize, cfg.double_quant), target_parameters=parameters,
                     rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, lora_bias=cfg.lora_bias, bias=cfg.bias,
                     initial=streamed)
        self._targets = targets
        if cfg.gradient_checkpointing:
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
            if not getattr(self.model, "supports_gradient_checkpointing", True):
                raise UsageError(f"--gradient-checkpointing: {type(self.model).__name__} does not support it "
                                 "(transformers has no checkpointing for this architecture); train without it.")
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._input_grads = True
            self.model.enable_input_require_grads()
        self.attn = getattr(self.model.config, "_attn_implementation", "eager") or "eager"
        if cfg.packing:
            self.attn_windows = packed_windows(self.model, attention_windows(self.model.config), cfg.seq_len)
            check_packing_supported(self.attn, self.attn_windows)
            self.positions, self.image_blocks = multimodal_positions(self.model), image_blocks_of(self.model)
            self.numbering = example_positions(self.model)

    def _add_adalora(self) -> None:
        """AdaLoRA's schedule needs the number of steps, known only once the data is loaded."""
        from qlora.model.adalora import AdaLoraHooks, add_adalora

        cfg = self.config
        torch.manual_seed(cfg.seed)
        try:
            add_adalora(self.model, init_r=cfg.adalora_init_r, target_r=cfg.adalora_target_r, tinit=cfg.adalora_tinit,
                        tfinal=cfg.adalora_tfinal, deltaT=cfg.adalora_delta_t, total_step=self.total_steps,
                        alpha=cfg.alpha, dropout=cfg.dropout, target_modules=self._targets, verbose=False)
        except UsageError as exc:
            raise UsageError(f"--adalora: {exc} (this run has {self.total_steps} steps)") from None
        self.adapter_hooks = AdaLoraHooks(self.model)

    def _prepare_method(self) -> None:
        """Work of the training method once model and data are ready, before DDP/FSDP wrap the
        model (preference methods: reference log-probs with --precompute-ref)."""

    def _parallelize(self) -> None:
        """Under torchrun: DDP replicas, or FSDP2 shards with --fsdp. ``self.model``
        stays the plain model (adapter I/O, parameters); ``self.forward_model``
        is what the loss runs through."""
        self.forward_model = self.model
        if not self.dist.enabled:
            return
        if self.config.fsdp:
            shard_fsdp(self.model, self.dist, self.dtype)
        else:
            self.forward_model = wrap_ddp(self.model, self.dist)

    def _hold_out(self, examples: list, what: str = "examples") -> tuple[list, list]:
        """``(train, held out)`` examples (or ``what`` else) for ``--eval-split``."""
        cfg = self.config
        return hold_out(examples, cfg.eval_split, cfg.seed, cfg.eval_split_order, cfg.shuffle, what)

    def _read_data(self, source: str, split: str, split_option: str = "--data-split"):
        """The examples of ``source`` (``split`` given by ``split_option``); ``_source_ends`` holds where each of its
        sources' examples end."""
        cfg = self.config
        self._source_ends: list[int] = []

        def read(records):
            examples = normalize(records, cfg.format, cfg.data_fields, cfg.media_folder)
            self._source_ends.append((self._source_ends[-1] if self._source_ends else 0) + len(examples))
            return examples

        subset, subset_option = self._subset(split_option)
        return read_sources(source, split, subset, cfg.max_samples, read, cfg.dataset_dir, self.sample_rng,
                            split_option=split_option, subset_option=subset_option)

    def _subset(self, split_option: str) -> tuple[str | None, str]:
        """The subset of the data ``split_option`` gives the split of, and the option that picks it: --eval-data's
        is --eval-data-subset, or without it --data-subset's (TRL's one dataset_config names both)."""
        cfg = self.config
        if split_option == "--eval-data-split":
            return (cfg.data_subset if cfg.eval_data_subset is None else cfg.eval_data_subset), "--eval-data-subset"
        return cfg.data_subset, "--data-subset"

    def _eval_parts(self, ends: list[int]) -> list[tuple[str, int, int]]:
        """``(name, start, end)`` of each --eval-data source's eval units, evaluated apart (its batches its own)
        and recorded as ``<name>_loss`` beside the whole's loss, as transformers logs a dict of eval datasets; none
        (the whole alone) for one source, and where units span sources (packed rows, text blocks) or are
        preference pairs."""
        cfg = self.config
        if len(ends) < 2 or cfg.packing or cfg.group_texts or cfg.method != "sft":
            return []
        indices = [u.index for u in self.eval_units]  # the examples' order: rows skipped or deduplicated left out
        bounds = [0, *(bisect_left(indices, end) for end in ends)]
        names = source_names(cfg.eval_data, cfg.dataset_dir, cfg.method)
        return list(zip(names, bounds, bounds[1:]))

    def _tokenize(self, examples):
        cfg = self.config
        with_images = self._image_tokenizer(examples)
        if cfg.group_texts:  # LLaMA-Factory's stage pt: blocks cut from the texts' stream
            return text_blocks(examples, self.tokenizer, cfg.seq_len, cfg.group_texts, cfg.group_shards, cfg.template)
        tokenized, report = tokenize_dataset(examples, self.tokenizer, self.chat_format, cfg.train_on, cfg.seq_len,
                                             stop_ids=self._stop_ids(), with_images=with_images)
        tokenized = self._deduped(tokenized)
        if cfg.packing:
            order = shuffled_indices(len(tokenized), cfg.seed, 0) if cfg.shuffle else range(len(tokenized))
            return pack_examples([tokenized[i] for i in order], cfg.seq_len), report
        return tokenized, report

    def _positions(self, units: list) -> int:
        """The most positions a forward pass over ``units`` takes (checked against a learned position table)."""
        return longest_positions(units)

    def _deduped(self, units: list) -> list:
        """``units`` without repeats of the examples kept so far, under --dedupe."""
        if not self.config.dedupe:
            return units
        kept = drop_duplicates(units, self.seen_rows)
        self.duplicates += len(units) - len(kept)
        return kept

    def _tokenize_eval(self, examples) -> list:
        """The held-out units; held-out rows that are all skipped are refused naming them as eval data."""
        cfg = self.config
        try:
            units, self.eval_report = self._tokenize(examples)
            return units
        except NothingToTrain as exc:
            if cfg.eval_data:
                source, fix = (f"--eval-data {cfg.eval_data}: {exc.subject('of it')}",
                               f"{exc.fix}; or leave --eval-data out")
            else:
                source, fix = (f"--eval-split {cfg.eval_split:g}: {exc.subject(f'it holds out of --data {cfg.data}')}",
                               "give held-out data with answers as --eval-data instead, or a larger --eval-split (or "
                               "none) to draw other rows")
            raise UsageError(f"{source} nothing to evaluate: {exc.counts}. Such rows are skipped; {fix}.") from None

    def _image_tokenizer(self, examples):
        """What tokenizes rows with images (the model's processor), or None when no row has any."""
        first = next((e for e in examples if e.images), None)
        if first is None:
            return None
        cfg = self.config
        if cfg.method != "sft":
            raise UsageError(f"{first.where}: this row holds images; qlora trains on images with --method sft only.")
        if cfg.group_texts:
            raise UsageError(f"{first.where}: this row holds images; --group-texts cuts a stream of plain texts "
                             "into blocks, which would cut images apart. Use --packing, which keeps each example "
                             "(and its images) whole, or train without either.")
        if cfg.packing:
            check_image_packing(self.model, first.where)
        processor = self._image_processor(first.where)
        stops = self._stop_ids()
        return image_row_tokenizer(self.model, processor, self.chat_format, cfg.train_on, cfg.seq_len, stops)

    def _image_processor(self, where: str):
        """The model's processor (loaded once), for the rows with images; ``where``: the first such row."""
        if getattr(self, "processor", None) is None:
            from qlora.model.image_processor import load_image_processor

            self.processor = load_image_processor(self.config.model, self.model, self.tokenizer, where,
                                                  bounds=self.config.pixel_bounds)
        return self.processor

    def _save_pixel_bounds(self, folder: Path) -> None:
        """The run's image bounds beside its adapter, for a run that read images (a text-only run's bounds, such as
        a LLaMA-Factory file's defaults, bound nothing)."""
        if getattr(self, "processor", None) is not None:
            self.config.pixel_bounds.save(folder)

    def _stop_ids(self) -> set[int]:
        """Ids that end an assistant turn: the tokenizer's end markers, the model's generation EOS ids and
        --eot-tokens (each one token, as axolotl requires of its eot_tokens)."""
        from qlora.model.trained_tokens import turn_end_ids

        return turn_end_ids(self.model, self.tokenizer, self.config.eot_tokens)

    def _chat_format(self, resume_from: Path | None) -> ChatFormat:
        """The run's chat format; its date is pinned now (or taken from the checkpoint on --resume) and
        recorded in config.yaml, so the data are the same tokens whatever the day. Started from an adapter: the
        format it was trained with (as generate and chat would render), or --template chosen over it keeping the rest
        of it (:meth:`ChatFormat.keeping`: its date, the variables the template reads, its system folding)."""
        cfg = self.config
        started = ChatFormat.load(cfg.adapter) if cfg.adapter else None
        if not cfg.template_date:
            saved = json.loads((resume_from / "run_config.json").read_text()) if resume_from else {}
            cfg.template_date = saved.get("template_date") or (started.date if started else "") or today()
        if started is not None and cfg.template == "auto":
            return replace(started, system_into_user=started.system_into_user or cfg.system_into_user).with_date(
                cfg.template_date)
        fmt = resolve_chat_format(self.tokenizer, cfg.template, cfg.template_date, cfg.system_into_user)
        return fmt.keeping(started).with_date(cfg.template_date)

    def _collate(self, units: list) -> dict[str, torch.Tensor]:
        pad = pad_token_id(self.tokenizer)
        if self.config.packing:
            batch = packed_collate(units, pad, self.attn, self.dtype, self.attn_windows, self.positions,
                                   self.image_blocks, self.numbering, prefix_type(self.model) is not None)
        else:
            batch = pad_collate(units, pad)
        return {k: {t: m.to(self.device) for t, m in v.items()} if isinstance(v, dict)
                else v.to(self.device, self.dtype) if k.startswith("pixel_values") else v.to(self.device)
                for k, v in batch.items()}

    def step_units(self, step: int) -> list[int]:
        """Indices of the units of optimizer step ``step``, all ranks': a slice of its epoch's order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        n, size = len(self.train_units), self.global_batch
        return self._order(epoch)[k * size:min((k + 1) * size, n)]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of optimizer step ``step``: a pure function of (seed, step). The step's
        units are cut into global micro-batches of ``batch x ranks`` (the last one short at an epoch's end)."""
        bs, world, rank = self.config.batch_size, self.dist.world_size, self.dist.rank
        indices = self.step_units(step)
        batches = []
        for m in range(0, len(indices), bs * world):
            units = [self.train_units[i] for i in indices[m:m + bs * world]]  # global micro-batch
            batches.append(self._collate_share(units, rank * bs, bs))
        return batches

    def _collate_share(self, units: list, start: int, size: int) -> dict[str, torch.Tensor]:
        """This rank's units ``start .. start+size-1`` of the global micro-batch ``units``, collated (KTO pairs
        its KL rows over the whole global micro-batch); a stand-in where a short micro-batch leaves it none."""
        share = units[start:start + size]
        return self._collate(share) if share else self._stand_in(units)

    def _stand_in(self, units: list) -> dict[str, torch.Tensor]:
        """A rank's micro-batch when a short global micro-batch leaves it no unit. DDP and FSDP need every rank
        in every forward and backward, so it runs the first unit with every label masked: no trainable token,
        a loss of exactly 0 and zero gradients (the token count is all-reduced, so the step's scale is that of
        the real units)."""
        batch = self._collate_share(units, 0, 1)
        batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
        batch["stand_in"] = True
        return batch

    def _order(self, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(len(self.train_units)))
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_order = epoch, shuffled_indices(len(self.train_units), self.config.seed, epoch)
        return self._cached_order

    def _no_sync(self, last: bool):
        """DDP all-reduces once per step: on the last micro-batch's backward only."""
        if last or self.forward_model is self.model:
            return nullcontext()
        return self.forward_model.no_sync()

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    # ----------------------------------------------------------------- train
    def train(self) -> None:
        """Run optimizer steps until ``total_steps``.

        Ctrl-C or SIGTERM only sets a flag: the step in progress finishes, a
        checkpoint is written, then :class:`Interrupted` is raised. A second
        Ctrl-C stops at once (the last checkpoint stays intact).
        """
        cfg = self.config
        # transformers counts epochs in micro-batches (its eval_delay in epochs); it has no --max-steps-per-epoch
        micro_batches = 0 if cfg.max_steps_per_epoch else math.ceil(len(self.train_units) / (
            cfg.batch_size * self.dist.world_size))
        cadence = Cadence(self.total_steps, self.steps_per_epoch, cfg.eval_strategy, cfg.save_strategy,
                          cfg.logging_strategy, cfg.eval_steps, cfg.save_steps, cfg.logging_steps, cfg.eval_delay,
                          cfg.grad_accum, micro_batches)
        self._stop_signal = None
        previous = _install_stop_handlers(self)
        if cfg.eval_on_start and self.step == 0 and self.eval_units:
            self.evaluate()  # a check of the eval before training: the plateau schedule does not count it
        try:
            while self.step < self.total_steps:
                if self._stop_requested():
                    raise Interrupted(self.step, self._stop_checkpoint())
                self._log_window.append(self.train_step())
                self.step += 1
                if cadence.logs(self.step):
                    self.metrics.log(window_record(self._log_window))
                    self._log_window = []
                self.metrics.advance()  # after the record, so a progress line shows this step's loss
                if cadence.evaluates(self.step) and self.eval_units:
                    loss = self.evaluate()["loss"]
                    if self.on_plateau:
                        self.scheduler.step(loss)
                if cadence.saves(self.step):
                    # The last state is checkpointed whatever --save-steps (all strategies but no): if the final
                    # evaluation or save fails, e.g. on a full disk, --resume finishes without retraining.
                    self.save_checkpoint()
            if self._stop_requested():
                raise Interrupted(self.step, self._stop_checkpoint())
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.eval_units and cadence.evaluates_at_end():
            self.evaluate()

    def _stop_checkpoint(self) -> Path:
        """The checkpoint a stop leaves: this step's, written now unless it was just written (the step's save, or the
        checkpoint the run resumed from): writing it again would only lengthen the stop, which a job scheduler
        bounds by its grace period before it kills the run (Kubernetes: 30 s)."""
        if self._saved_step != self.step:
            return self.save_checkpoint()
        return self.out / CHECKPOINTS / f"step-{self.step:07d}"

    def _stop_requested(self) -> bool:
        """Whether any rank got Ctrl-C/SIGTERM: all ranks stop at the same step."""
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)

    def _reseed_step(self) -> None:
        """Ranks draw different dropout masks, each a function of (seed, step, rank),
        so a resumed multi-rank run repeats the masks of an uninterrupted one."""
        if self.dist.enabled:
            torch.manual_seed(int(np.random.SeedSequence([self.config.seed, self.step, self.dist.rank]).generate_state(1)[0]))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; the loss is normalized by all their
        tokens, on every rank (the count is all-reduced), and the gradients are summed over ranks."""
        self.model.train()
        self._reseed_step()
        start = time.perf_counter()
        batches = self.micro_batches(self.step)
        norm = self._step_normalizer(batches)
        self.optimizer.zero_grad(set_to_none=True)
        total, stats = 0.0, {}
        for i, batch in enumerate(batches):
            with self._no_sync(last=i == len(batches) - 1):
                loss, sums = self._loss_reaching_adapters(batch, norm)
                if not torch.isfinite(loss):
                    self._stop_nonfinite("loss", batch)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
            stats = {k: stats.get(k, 0.0) + v for k, v in sums.items()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.fsdp:
            all_reduce_grads(params, self.dist)
        penalty = 0.0
        if self.adapter_hooks is not None:
            # Once per optimizer step, whatever grad_accum is, and once whatever the ranks: it depends on the
            # adapters alone (the same on every rank), so each rank adds its gradient after the sum over ranks
            # (DDP's all-reduce ran with the last micro-batch's backward) and it is not part of the summed loss.
            extra = self.adapter_hooks.extra_loss()
            (self.scaler.scale(extra) if self.scaler else extra).backward()
            penalty = extra.item()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.step == 0:
            self._check_gradients_reach_adapters()
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm) and self.scaler is None:
            self._stop_nonfinite("gradient", batches[-1])
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = False
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # non-finite fp16 gradients: no update was made and the scale was lowered (accelerate's test)
            skipped = self.scaler.get_scale() < scale
        else:
            self.optimizer.step()
        if self.adapter_hooks is not None:
            self.adapter_hooks.after_step(self.step)
        if not self.on_plateau and not skipped:  # transformers' schedule counts the updates made, not the steps
            self.scheduler.step()
        tokens = sum(b["input_ids"].numel() for b in batches if "stand_in" not in b)
        sums = torch.tensor([total, tokens], dtype=torch.float64, device=self.device)
        total, n_tokens = self.dist.all_reduce_sum(sums).tolist()
        total += penalty
        self.losses.append(total)
        elapsed = time.perf_counter() - start
        return {"split": "train", "step": self.step + 1, "loss": total, **self._step_metrics(stats), "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": n_tokens / max(elapsed, 1e-9), "gpu_mem_gib": gpu_memory_gib()}

    def _loss_reaching_adapters(self, batch: dict[str, torch.Tensor],
                                norm: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """:meth:`_micro_loss`, checked once per process: a loss without a graph (no adapter can get a gradient)
        is computed again with the input embeddings' output requiring grad, the RNG rewound so that dropout draws
        what a run with it from the start draws.

        Layers that run inside an autograd Function of their own (Reformer's reversible layers, which recompute
        their activations in the backward) put into the graph only the inputs they are given, not the weights they
        use: on a frozen embedding nothing requires grad and the adapters inside get none. Most models need no
        input gradients (the adapters' own weights start the graph); enabling them always would add a backward pass
        through the first layer, and break a model that scales its embeddings in place (CTRL).
        """
        if self._graph_checked:
            return self._micro_loss(batch, norm)
        rng = _rng_state()
        loss, sums = self._micro_loss(batch, norm)
        self._graph_checked = True
        if loss.requires_grad or self._input_grads:
            return loss, sums
        self._input_grads = True
        self.model.enable_input_require_grads()
        _set_rng_state(rng)
        loss, sums = self._micro_loss(batch, norm)
        if not loss.requires_grad:
            raise UsageError(f"the loss of {type(self.model).__name__} does not depend on any trainable parameter, "
                             "even with gradients from its inputs: no adapter can learn. Check --target-modules "
                             "(the adapted layers must be on the path to the loss).")
        return loss, sums

    def _step_normalizer(self, batches: list[dict[str, torch.Tensor]]) -> Any:
        """What each micro-batch's loss is divided by: the trainable tokens of the whole step, all ranks."""
        local = torch.tensor([sum(count_trainable_tokens(b) for b in batches)], dtype=torch.float64, device=self.device)
        return self.dist.all_reduce_sum(local).item()

    def _micro_loss(self, batch: dict[str, torch.Tensor], norm: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss, and sums of step metrics (none for SFT)."""
        with self._autocast():
            return token_loss_sum(self.forward_model, batch, self.chunked_ce) / norm, {}

    def _step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics of a step from the micro-batches' summed ``sums`` (none for SFT)."""
        return {}

    def _check_gradients_reach_adapters(self) -> None:
        """After the first backward pass the adapters must have gradients (every B
        matrix a non-zero one; A's is zero while B is still zero). Catches the silent
        failure where checkpointing on a frozen base cuts the graph and the run
        'trains' without changing anything: no adapter is reached. Some adapters
        without a gradient is a warning: the batch may just not reach them (or the model's own autograd
        Function hides them)."""
        dead = [n for n, p in self.model.named_parameters() if p.requires_grad
                and (p.grad is None or (self._zero_at_init(n) and not bool(p.grad.abs().sum() > 0)))]
        trained = sum(1 for p in self.model.parameters() if p.requires_grad)
        if dead and len(dead) < trained:  # the graph reaches the adapters, just not all of them in this batch
            layers = sorted({n.split(".lora_")[0] for n in dead})
            log = logging.getLogger("qlora")
            if non_text_names(self.model):
                # A vision-language model's decoder can hold layers only images reach (Llama 3.2 Vision's
                # cross-attention): on text their adapters stay zero, which changes nothing; freeze them.
                for name, p in self.model.named_parameters():
                    if name.split(".lora_")[0] in layers:
                        p.requires_grad_(False)
                        p.grad = None
                log.warning("qlora: %d adapted layers get no gradient from text (e.g. %s: layers only images "
                            "reach); their adapters stay zero.", len(layers), layers[0])
            else:
                # Layers a batch may not reach: DeepSeek-V4's compressors on sequences shorter than their
                # block, experts no token was routed to; they train once a batch reaches them. Or layers run
                # inside the model's own autograd Function (Reformer's reversible layers), which the graph
                # of the loss does not reach at all.
                log.warning("qlora: %d adapted layers got no gradient in the first step (e.g. %s): this batch "
                            "does not reach them (a compressor of long sequences, an expert no token chose, a "
                            "gate still at zero), or the model computes them in a way the loss's graph does not "
                            "see (its own autograd Function, as Reformer's reversible layers); in the first case "
                            "they train once a batch does, in the second never. If they should not train, leave "
                            "them out with --target-modules.", len(layers), layers[0])
            return
        if dead:
            raise UsageError(f"no gradient reached {len(dead)} adapter parameters in the first step (e.g. "
                             f"{dead[0]}); the loss does not depend on them. Check --gradient-checkpointing "
                             "with this model, or report the model architecture as a qlora bug.")

    def _zero_at_init(self, name: str) -> bool:
        """The adapter factor that starts at zero, hence the one the first gradient must reach:
        LoRA's B; AdaLoRA's singular values E (its P and Q get zero gradients while E = 0)."""
        return ("lora_E" in name) if self.config.adalora else ("lora_B" in name)

    def _stop_nonfinite(self, what: str, batch: dict[str, torch.Tensor]) -> None:
        module = first_nonfinite_module(self.model, batch)
        where = f"; first non-finite output: {module}" if module else ""
        last = list_checkpoints(self.out)
        kept = f"; the last good checkpoint is {last[-1]}" if last else "; no checkpoint was written yet"
        raise UsageError(f"non-finite {what} at step {self.step + 1}{where}{kept}. "
                         "Lower --lr, check the data, or use --precision fp32.")

    def _parts(self) -> list[tuple[str, int, int]]:
        """:meth:`_eval_parts`, or the whole eval data as one unnamed part."""
        return self.eval_parts or [("", 0, len(self.eval_units))]

    def _eval_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], bool, int]]:
        """This rank's share of the eval batches, as ``(batch, mine, part)``: the batches are those of one process
        (``--batch-size`` units each, in order, a batch within one part of :meth:`_eval_parts`), batch ``i``
        evaluated on rank ``i mod ranks``. A rank short of a batch in the last round repeats its first with ``mine``
        false, to be computed and left out: under FSDP every forward gathers the shards with all ranks, so every
        rank runs as many."""
        bs, world = self.config.batch_size, self.dist.world_size
        parts = self._parts()
        batches = [(start, min(start + bs, end), k) for k, (_, begin, end) in enumerate(parts)
                   for start in range(begin, end, bs)]
        mine = batches[self.dist.rank::world]
        for round_ in range(math.ceil(len(batches) / world)):
            start, end, part = mine[round_] if round_ < len(mine) else batches[0]
            yield self._collate(self.eval_units[start:end]), round_ < len(mine), part

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss (per trainable token) and perplexity on --eval-data, each rank evaluating its share; with several
        sources, each one's too."""
        self.model.eval()
        parts = self._parts()
        totals = torch.zeros(len(parts), 2, dtype=torch.float64, device=self.device)  # loss sum, trainable tokens
        for batch, mine, part in self._eval_batches():
            with self._autocast():
                loss_sum = token_loss_sum(self.model, batch, self.chunked_ce)
            if mine:
                totals[part] += torch.stack([loss_sum.double(), loss_sum.new_tensor(count_trainable_tokens(batch),
                                                                                    dtype=torch.float64)])
        sums = self.dist.all_reduce_sum(totals).tolist()
        loss = sum(s for s, _ in sums) / max(sum(t for _, t in sums), 1)
        record = {"split": "eval", "step": self.step, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        each = []
        for (name, _, _), (part_sum, tokens) in zip(parts, sums) if len(parts) > 1 else ():
            part_loss = part_sum / tokens if tokens else None  # a source whose rows were all skipped: null
            record[f"{name}_loss"] = part_loss
            record[f"{name}_perplexity"] = None if part_loss is None else math.exp(min(part_loss, 50.0))
            each.append(f"{name} {part_loss:.4f}" if part_loss is not None else f"{name} none")
        self.metrics.log(record)
        self.metrics.write(f"step {self.step}: eval loss {loss:.4f}, perplexity {record['perplexity']:.2f}"
                           + (f" ({', '.join(each)})" if each else ""))
        return record

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write adapter + optimizer + scheduler + RNG + step atomically; keep the last --save-total-limit.

        Rank 0 alone writes: the adapter and optimizer states are whole and
        identical on every rank, so the checkpoint is that of one process."""
        from qlora.model.adapter_io import save_adapter

        target = self.out / CHECKPOINTS / f"step-{self.step:07d}"
        self._saved_step = self.step
        if not self.dist.is_main:
            self.dist.barrier()
            return target
        for stale in target.parent.glob(".step-*.tmp-*"):  # half-written by a run killed mid-save (kill -9, OOM)
            shutil.rmtree(stale, ignore_errors=True)
        clear_leftovers(target.parent)  # a checkpoint replaced or set aside by a killed save: removed or put back
        with atomic_dir(target) as tmp:
            save_adapter(self.model, tmp / "adapter", tokenizer=self._adapter_tokenizer(),
                         tokenization=self._tokenization())
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": _rng_state(), "losses": self.losses,
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "metric_records": len(self.metrics.records),
                     "log_window": self._log_window,
                     "adapter_hooks": self.adapter_hooks.state_dict() if self.adapter_hooks else None}
            with open(tmp / STATE_FILE, "wb") as fh:  # a file object: a full disk raises OSError, not RuntimeError
                torch.save(state, fh)
            run_config = {**self.run_config, "template_date": self.config.template_date,
                          "epoch_steps": True, "no_decay_groups": not self._decay_all}
            (tmp / "run_config.json").write_text(json.dumps(run_config, indent=1))
            self.chat_format.save(tmp / "adapter")
            self._save_pixel_bounds(tmp / "adapter")
        limit = self.config.save_total_limit
        if limit:
            for old in list_checkpoints(self.out)[:-limit]:
                # hidden first (one rename), then removed: a kill mid-removal leaves no step-N folder that is no
                # checkpoint, only a temporary one the next save clears
                doomed = old.with_name(f".{old.name}.tmp-removed")
                os.replace(old, doomed)
                shutil.rmtree(doomed)
        self.dist.barrier()
        return target

    def _load_checkpoint(self, path: Path) -> None:
        from qlora.model.adapter_io import adapter_state_dict
        from qlora.model.residual_convert import first_half
        from qlora.nn.residual_init_names import is_residual_init
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        name = ADAPTER_WEIGHTS
        try:  # damage past the headers that checkpoint_damage read (other bytes inside the data)
            saved = load_file(str(path / name))
            name = STATE_FILE
            state = torch.load(path / name, weights_only=True)
        except (RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:  # torch: 'weights only load failed'
            first = str(exc).split(". ")[0]
            raise UsageError(damaged_checkpoint_message(self.out, list_checkpoints(self.out),
                                                        f"{name} does not read: {first}")) from None
        current = adapter_state_dict(self.model)
        with torch.no_grad():
            for key, tensor in current.items():
                if self.adapter_hooks is not None and ".lora_" in key:  # AdaLoRA's triplets: from its state below
                    continue
                # a PiSSA/OLoRA checkpoint holds the converted adapter [A; A0], [B, -B0]; this run's init has
                # recomputed A0, B0 (and the residual base) from the original weights, so A and B are its first half
                tensor.copy_(first_half(saved[key], tensor) if is_residual_init(self.config.init) else saved[key])
        if self.adapter_hooks is not None:  # AdaLoRA: every triplet, the pruned ones too, and its schedule's state
            self.adapter_hooks.load_state_dict(state["adapter_hooks"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step, self.losses = state["step"], list(state["losses"])
        self._saved_step = self.step
        self._saved_records = state.get("metric_records")  # absent from checkpoints written before it was counted
        self._log_window = list(state.get("log_window", []))

    def _tokenization(self) -> dict:
        """--train-on, --seq-len, --eot-tokens and --group-texts, recorded with the adapter as the defaults of
        ``qlora eval``."""
        from qlora.model.trained_tokens import tokenization_record

        cfg = self.config
        return tokenization_record(cfg.train_on, cfg.seq_len, cfg.eot_tokens, cfg.group_texts, cfg.group_shards,
                                   cfg.template)

    def _adapter_tokenizer(self):
        """The tokenizer, when the adapter needs it to be reloaded (added tokens)."""
        return self.tokenizer if self.config.add_special_tokens.strip() else None

    # ---------------------------------------------------------------- finish
    def save_final(self) -> None:
        """The adapter (PEFT format) and tokenizer at the top of --output; with --init loftq
        also its 4-bit base in ``loftq-base/`` (``load_model`` it, then ``load_adapter``); with
        --init pissa/olora the adapter converted to LoRA on the original model (``save_adapter``)."""
        if self.config.init == "loftq":  # its base is written whole: under FSDP every rank sends its shards
            with gathered_parameters(self.model, self.dist):
                self._write_final()
        else:
            self._write_final()

    def _write_final(self) -> None:
        """Rank 0's part of :meth:`save_final`."""
        from qlora.model.adapter_io import save_adapter
        from qlora.model.transformers4_compat import readable_by_transformers_4

        if not self.dist.is_main:
            return
        if self.adapter_hooks is not None:
            self.metrics.write(self.adapter_hooks.summary())
        # Everything is written into a staging folder first and moved in only when complete:
        # a full disk leaves the previous contents (and the last checkpoint) as they were.
        with staged_output(self.out, "train", replace=False) as stage:
            save_adapter(self.model, stage, tokenization=self._tokenization())  # eval measures as training did
            self.chat_format.save(stage)  # generate and chat render as training did
            self._save_pixel_bounds(stage)  # and show the model its images as training did
            self.tokenizer.chat_template = self.chat_format.template  # other tools loading --output see the same format
            self.tokenizer.save_pretrained(stage)
            readable_by_transformers_4(stage)  # as merged folders: tools on transformers 4 read it too
            if self.config.init == "loftq":  # the adapter is only valid on its LoftQ base: ship the base with it
                from qlora.model.quantized_io import save_quantized

                save_quantized(self.model, stage / LOFTQ_BASE, tokenizer=self.tokenizer)

    def _run_entries(self) -> tuple[str, ...]:
        """The top-level entries this run writes besides the tokenizer files (recorded as qlora's)."""
        return RUN_ENTRIES + ((LOFTQ_BASE,) if self.config.init == "loftq" else ())

    def _write_config(self) -> None:
        import yaml

        (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def cleanup(self, wait_for_ranks: bool = True) -> None:
        """Close the metric writers and draw loss.png; leave the process group (see DistContext.shutdown)."""
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.dist.shutdown(wait_for_ranks)

    def run(self) -> list[float]:
        """setup -> train -> save -> cleanup; returns the loss of every step of this process.

        Raises:
            RankLost: another rank stopped mid-run (its collectives fail here); the message names the last
                complete checkpoint, from which ``--resume`` continues.
        """
        together = False  # every rank at the same point: the run finished, or all stopped after one checkpoint
        try:
            self.setup()
            self.train()
            self.save_final()
            together = True
        except Interrupted:
            together = True
            raise
        except RuntimeError as exc:
            if not (self.dist.enabled and is_rank_lost(exc)):
                raise
            last = list_checkpoints(self.out)
            kept = (f"The last complete checkpoint is {last[-1]}: run the same command with --resume to continue "
                    "from it" if last else "No checkpoint was written yet")
            raise RankLost(f"rank {self.dist.rank} lost contact with the other ranks after step {self.step}: another "
                           f"rank stopped (killed, out of memory, or failed; the launcher names it). {kept}.") from None
        finally:
            # A rank that failed (alone, maybe: its batch's non-finite loss, its out of memory, its write to a full
            # disk) must not wait for the others at a barrier while they wait for it in another collective (a
            # step's all-reduce, DDP's start-up broadcast): a hang until the group's timeout. It leaves, and the
            # launcher stops the rest.
            self.cleanup(wait_for_ranks=together)
        return self.losses


def _install_stop_handlers(trainer: "Trainer") -> dict:
    """SIGINT/SIGTERM set ``trainer._stop_signal``; a second SIGINT interrupts at once.
    Returns the previous handlers (none off the main thread, where Python allows no handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, _frame) -> None:
        if trainer._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer._stop_signal = signum

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
