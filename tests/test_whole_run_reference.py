"""A whole short training run against transformers' ``Trainer`` (plain texts) or TRL's ``SFTTrainer``
(prompt-masked rows, its completion mask and loss) with PEFT LoRA: every step's loss, rate and gradient norm,
and the adapter at the end.

The reference shares nothing with qlora's training loop: the model is transformers' own in fp32 (a 4-bit base's
layers decoded from bitsandbytes' quantization), the adapter PEFT's ``PeftModel`` loaded from the one qlora starts
from (its B matrices made non-zero), the examples qlora tokenized fed in their order
(``train_sampling_strategy="sequential"``, or on transformers 4.x a sequential train sampler, against
``--no-shuffle``) and padded by the reference's own collator,
and the reference running the accumulation (``num_items_in_batch``: one division by the trained tokens of the
whole optimizer step), clipping, torch's AdamW, the schedule of ``get_scheduler``, epochs and the short last
step of each. Examples of very different lengths make a mean of micro-batch means differ from that division.
The options combine what a run's later steps depend on: warmup by steps and by ratio, each schedule's shape to
its last step, ``--max-steps`` running on into a further epoch, fractional epochs, clipping that bites, weight
decay, Adam's betas and epsilon.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer as HFTrainer,
    TrainingArguments,
)

from trl import SFTConfig, SFTTrainer  # noqa: E402

from qlora.model.adapter_io import save_adapter  # noqa: E402
from qlora.model.tiny import build_tiny_model  # noqa: E402
from qlora.train.config import load_config  # noqa: E402
from qlora.train.trainer import Trainer  # noqa: E402
from bnb_decoded import decode_quantized_layers  # noqa: E402
from random_adapters import randomize_lora_b  # noqa: E402
from trainer_records import IN_ORDER, LoggedRecords, in_order  # noqa: E402

_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None


def _warmup(steps_or_ratio: float) -> dict:
    """Warmup as a step count or, below 1, a ratio: transformers 5's ``warmup_steps`` takes both; 4.x has the
    ratio apart (``warmup_ratio``)."""
    if _V5 or steps_or_ratio >= 1 or steps_or_ratio == 0:
        return {"warmup_steps": steps_or_ratio}
    return {"warmup_ratio": steps_or_ratio}



WORDS = "alpha beta gamma delta fox dog lazy quick brown paged optimizer memory".split()


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + j * 7) % len(WORDS)] for j in range(n))


def _evaluated_run(trainer: Trainer, tmp_path) -> tuple[list[dict], list[dict], list[dict]]:
    """Run ``trainer`` from an adapter whose B is random (saved to tmp_path/adapter for PEFT to start from):
    its train rows, its eval rows and its metrics.jsonl records."""
    try:
        trainer.setup()
        randomize_lora_b(trainer.model, seed=1)
        save_adapter(trainer.model, tmp_path / "adapter")
        units = [dict(input_ids=u.input_ids, labels=u.labels) for u in trainer.train_units]
        held_units = [dict(input_ids=u.input_ids, labels=u.labels) for u in trainer.eval_units]
        trainer.train()
        lines = (trainer.out / "metrics.jsonl").read_text().splitlines()
        return units, held_units, [json.loads(line) for line in lines]
    finally:
        trainer.cleanup()


# 11 rows of 1 to ~40 words: with batch 2 x accumulation 2 an epoch is 3 steps, the last one 3 examples
# (a full micro-batch and a short one).
DATA = {
    "text": [{"text": _words(i, 1 + (13 * i) % 41)} for i in range(11)],
    "alpaca": [{"instruction": _words(i, 1 + (7 * i) % 15), "output": _words(i + 3, 1 + (11 * i) % 23)}
               for i in range(11)],
}

# name: (data, qlora's options, transformers' names for the schedule and its options)
CASES = {
    "linear-warmup-steps-accum2-maxsteps-into-epoch3": (
        "text", dict(train_on="all", batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_steps=2, max_steps=7,
                     max_grad_norm=0.05, weight_decay=0.1), "linear"),
    "cosine-warmup-ratio-accum3-two-epochs": (
        "alpaca", dict(batch_size=1, grad_accum=3, lr_scheduler="cosine", warmup_ratio=0.2, epochs=2,
                       max_grad_norm=1.0, weight_decay=0.0), "cosine"),
    "cosine-min-lr-accum4": (
        "text", dict(train_on="all", batch_size=1, grad_accum=4, lr_scheduler="cosine_with_min_lr",
                     lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=1, max_steps=6, max_grad_norm=0.0,
                     weight_decay=0.05), "cosine_with_min_lr"),
    "constant-with-warmup-ratio-logging-every-3": (
        "alpaca", dict(batch_size=2, grad_accum=2, lr_scheduler="constant", warmup_ratio=0.3, max_steps=8,
                       max_grad_norm=0.3, logging_steps=3), "constant_with_warmup"),
    "wsd-fractional-epochs-partial-last-step": (
        "text", dict(train_on="all", batch_size=2, grad_accum=3, lr_scheduler="warmup_stable_decay",
                     lr_scheduler_kwargs={"num_decay_steps": 2}, warmup_steps=1, epochs=2.5, max_grad_norm=0.5),
        "warmup_stable_decay"),
    "nf4-double-quant-linear-accum2": (
        "alpaca", dict(quant="nf4", double_quant=True, blocksize=32, batch_size=2, grad_accum=2,
                       lr_scheduler="linear", warmup_steps=1, max_steps=5, max_grad_norm=0.2, weight_decay=0.1),
        "linear"),
    # --logging-steps below 1: a share of the run's steps, rounded up (ceil(0.3 x 7) = 3), as transformers reads it
    "linear-logging-a-share-of-the-steps": (
        "text", dict(train_on="all", batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_steps=1, max_steps=7,
                     max_grad_norm=1.0, logging_steps=0.3), "linear"),
    # trained biases (the base's, --bias all, and LoRA's B, --lora-bias) under weight decay: transformers decays
    # the weights and leaves every bias alone
    "biases-trained-under-weight-decay": (
        "text", dict(train_on="all", batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_steps=1, max_steps=5,
                     max_grad_norm=1.0, weight_decay=0.5, bias="all", lora_bias=True), "linear"),
}
# the tiny Llama of a case, where it differs from the default one (biases for --bias to train)
MODEL_OPTIONS = {"biases-trained-under-weight-decay": dict(attention_bias=True, mlp_bias=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_run_equals_transformers_trainer(tmp_path, tiny_tokenizer, case):
    data_name, opts, schedule = CASES[case]
    oracle = "sft" if data_name == "alpaca" else "trainer"
    opts = dict(optim="adamw", lr=5e-3, rank=4, alpha=8, dropout=0.0, adam_beta1=0.85, adam_beta2=0.98,
                adam_epsilon=1e-6, shuffle=False, seed=3, progress=False, save_total_limit=0, quant="none",
                seq_len=128, warmup_ratio=0.0, output=str(tmp_path / "run")) | opts
    model_dir = build_tiny_model(tmp_path / "model", tokenizer=tiny_tokenizer, arch="llama",
                                 **MODEL_OPTIONS.get(case, {}))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA[data_name]))
    kwargs = opts.pop("lr_scheduler_kwargs", {})
    trainer = Trainer(load_config(None, opts | dict(model=str(model_dir), data=str(data),
                                                    lr_scheduler_kwargs=json.dumps(kwargs))))
    try:
        trainer.setup()
        randomize_lora_b(trainer.model, seed=1)
        save_adapter(trainer.model, tmp_path / "adapter")
        units = [dict(input_ids=u.input_ids, labels=u.labels) for u in trainer.train_units]
        trainer.train()
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        ours = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    finally:
        trainer.cleanup()

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if opts["quant"] != "none":
        decode_quantized_layers(plain, trainer.model, opts["quant"], opts["blocksize"], opts["double_quant"])
    model = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter", is_trainable=True)
    common = dict(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=opts["batch_size"],
        gradient_accumulation_steps=opts["grad_accum"], learning_rate=opts["lr"], lr_scheduler_type=schedule,
        lr_scheduler_kwargs=kwargs,
        **_warmup(opts.get("warmup_steps") or opts["warmup_ratio"]), max_steps=opts.get("max_steps", -1) or -1,
        num_train_epochs=opts.get("epochs", 1), max_grad_norm=opts["max_grad_norm"],
        weight_decay=opts.get("weight_decay", 0.0), adam_beta1=opts["adam_beta1"], adam_beta2=opts["adam_beta2"],
        adam_epsilon=opts["adam_epsilon"], optim="adamw_torch", **IN_ORDER,
        logging_steps=opts.get("logging_steps", 1), save_strategy="no", report_to=[], seed=opts["seed"], use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True)
    callback = LoggedRecords()
    if oracle == "sft":  # TRL's own collator and loss: the completion mask of the tokens qlora trains
        rows = Dataset.from_list([dict(input_ids=u["input_ids"], completion_mask=[int(t != -100) for t in u["labels"]])
                                  for u in units])
        args = SFTConfig(max_length=None, completion_only_loss=True, **common)
        in_order(SFTTrainer)(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                             callbacks=[callback]).train()
    else:
        in_order(HFTrainer)(model=model, args=TrainingArguments(remove_unused_columns=False, **common),
                            train_dataset=units, callbacks=[callback], data_collator=DataCollatorForSeq2Seq(
                                tokenizer, padding=True, label_pad_token_id=-100)).train()
    reference = {n.removeprefix("base_model.model."): p.detach() for n, p in model.named_parameters()
                 if p.requires_grad}

    # a record every --logging-steps steps (their mean loss, the last one's rate and norm) and at the last step
    every = opts.get("logging_steps", 1)
    every = math.ceil(trainer.total_steps * every) if every < 1 else every
    assert [r["step"] for r in records] == sorted({*range(every, trainer.total_steps + 1, every), trainer.total_steps})
    by_step = {r["step"]: r for r in records}
    assert [t["step"] for t in callback.logs] == list(range(every, trainer.total_steps + 1, every))
    for theirs in callback.logs:
        mine = by_step[theirs["step"]]
        assert mine["lr"] == pytest.approx(theirs["learning_rate"], rel=1e-9, abs=1e-15), mine["step"]
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
        if "grad_norm" in theirs or _V5:  # transformers 4.x logs no gradient norm where it does not clip
            assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]
    assert reference.keys() == ours.keys()
    for name, p in reference.items():
        torch.testing.assert_close(ours[name], p, rtol=1e-4, atol=1e-6, msg=name)


class _Evaluations(LoggedRecords):
    """The step and eval loss of each of the reference's evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.evals: list[tuple[int, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals.append((state.global_step, metrics["eval_loss"]))


@pytest.mark.parametrize("strategy", [dict(eval_strategy="steps", eval_steps=1, eval_delay=2),
                                      dict(eval_strategy="epoch", eval_delay=1.6)], ids=["steps", "epoch"])
def test_eval_on_start_and_eval_delay_evaluate_as_transformers_trainer(tmp_path, tiny_tokenizer, strategy):
    """transformers' eval_on_start and eval_delay: the steps its Trainer evaluates at and their eval losses (one
    eval batch of every held-out text: its loss is the mean over their tokens, as qlora's). 11 texts, batch 2 x
    accumulation 4, 1.5 epochs: 3 steps, the last 4 of the second epoch's 6 micro-batches (1.67 epochs)."""
    opts = dict(optim="adamw", lr=5e-3, rank=4, alpha=8, dropout=0.0, shuffle=False, seed=3, progress=False,
                save_total_limit=0, save_strategy="no", quant="none", seq_len=128, train_on="all", batch_size=2,
                grad_accum=4, epochs=1.5, lr_scheduler="linear", warmup_steps=1, max_grad_norm=1.0,
                eval_on_start=True, output=str(tmp_path / "run")) | strategy
    model_dir = build_tiny_model(tmp_path / "model", tokenizer=tiny_tokenizer, arch="llama")
    data, held = tmp_path / "data.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA["text"]))
    held.write_text("".join(json.dumps({"text": _words(i + 20, 3 + 4 * i)}) + "\n" for i in range(3)))
    trainer = Trainer(load_config(None, opts | dict(model=str(model_dir), data=str(data), eval_data=str(held))))
    units, held_units, records = _evaluated_run(trainer, tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                           tmp_path / "adapter", is_trainable=True)
    callback = _Evaluations()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        per_device_eval_batch_size=len(held_units), learning_rate=opts["lr"], lr_scheduler_type="linear",
        warmup_steps=1, num_train_epochs=1.5, max_grad_norm=1.0, optim="adamw_torch", seed=3,
        **IN_ORDER, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, eval_on_start=True, **strategy)
    in_order(HFTrainer)(model=model, args=args, train_dataset=units, eval_dataset=held_units, callbacks=[callback],
                        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()

    ours = [(r["step"], r["loss"]) for r in records if r["split"] == "eval"]
    assert [s for s, _ in ours] == [s for s, _ in callback.evals]
    assert [s for s, _ in ours] == ([0, 2, 3] if strategy["eval_strategy"] == "steps" else [0, 3])
    for (step, mine), (_, theirs) in zip(ours, callback.evals):
        assert mine == pytest.approx(theirs, rel=1e-5), step


def test_several_eval_sources_are_each_recorded_as_transformers_logs_a_dict_of_eval_datasets(tmp_path, tiny_tokenizer):
    """--eval-data a,b: each eval record holds the whole's loss and, per source (named by its file), the
    ``<name>_loss`` transformers' Trainer logs as ``eval_<name>_loss`` for ``eval_dataset={name: ...}``, at the same
    steps with the same values (one eval batch of each source there: its loss is the mean over its tokens)."""
    opts = dict(optim="adamw", lr=5e-3, rank=4, alpha=8, dropout=0.0, shuffle=False, seed=3, progress=False,
                save_total_limit=0, save_strategy="no", quant="none", seq_len=128, train_on="all", batch_size=2,
                grad_accum=2, max_steps=4, lr_scheduler="linear", warmup_steps=1, max_grad_norm=1.0,
                eval_strategy="steps", eval_steps=2, output=str(tmp_path / "run"))
    model_dir = build_tiny_model(tmp_path / "model", tokenizer=tiny_tokenizer, arch="llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA["text"]))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    held = {"news": tmp_path / "a" / "news.jsonl", "chat": tmp_path / "b" / "chat.jsonl.gz"}
    import gzip
    held["news"].write_text("".join(json.dumps({"text": _words(i + 20, 3 + 4 * i)}) + "\n" for i in range(3)))
    with gzip.open(held["chat"], "wt") as fh:
        fh.write("".join(json.dumps({"text": _words(i + 40, 9 + 5 * i)}) + "\n" for i in range(2)))
    trainer = Trainer(load_config(None, opts | dict(model=str(model_dir), data=str(data),
                                                    eval_data=f"{held['news']},{held['chat']}")))
    units, held_units, records = _evaluated_run(trainer, tmp_path)

    logged = []

    class Evaluations(LoggedRecords):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            logged.append(dict(metrics, step=state.global_step))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                           tmp_path / "adapter", is_trainable=True)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        per_device_eval_batch_size=3, learning_rate=opts["lr"], lr_scheduler_type="linear", warmup_steps=1,
        max_steps=4, max_grad_norm=1.0, optim="adamw_torch", seed=3, **IN_ORDER,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, eval_strategy="steps", eval_steps=2)
    in_order(HFTrainer)(model=model, args=args, train_dataset=units, callbacks=[Evaluations()],
                        eval_dataset={"news": held_units[:3], "chat": held_units[3:]},
                        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()

    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] == sorted({t["step"] for t in logged})
    for record in evals:
        for name in ("news", "chat"):
            theirs = next(t[f"eval_{name}_loss"] for t in logged if t["step"] == record["step"] and
                          f"eval_{name}_loss" in t)
            assert record[f"{name}_loss"] == pytest.approx(theirs, rel=1e-5), (record["step"], name)
            assert record[f"{name}_perplexity"] == pytest.approx(math.exp(theirs), rel=1e-5)
        tokens = [sum(t != -100 for t in u["labels"][1:]) for u in held_units]  # each label predicts the next token
        whole = (record["news_loss"] * sum(tokens[:3]) + record["chat_loss"] * sum(tokens[3:])) / sum(tokens)
        assert record["loss"] == pytest.approx(whole, rel=1e-9)
