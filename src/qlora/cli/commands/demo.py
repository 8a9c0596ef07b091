"""``qlora demo``: the whole method in about a minute on a laptop CPU, no download.

Builds a small random Llama-architecture model and a tokenizer from the
instruction data shipped with qlora (12 countries and their capitals, each
asked four ways), quantizes the model to NF4, QLoRA-trains an adapter on that
data (the loss is printed as it falls), then asks some of the questions with
greedy decoding, first with the adapter disabled (the untrained base) and then
with it, and counts the correct answers of each, so the effect is measurable.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

NAME = "demo"
HELP = "build, QLoRA-train and query a tiny model in about a minute on a CPU"

# Held-in questions asked before and after training, with the expected capital.
QUESTIONS = (
    ("What is the capital of France?", "Paris"),
    ("Which city is the capital of Japan?", "Tokyo"),
    ("Name the capital city of Kenya.", "Nairobi"),
    ("Norway: what is its capital?", "Oslo"),
    ("What is the capital of Peru?", "Lima"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..options import positive_float, positive_int

    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    parser.add_argument("--output", default=None,
                        help="keep the base model (OUTPUT/model) and the trained adapter (OUTPUT/adapter) here, for "
                             "the other commands (default: a temporary folder, removed at the end)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace qlora's earlier results in an existing --output (only files qlora wrote)")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ...atomic import give_default_modes
    from ...model.inject import adapters_disabled
    from ...model.tiny import build_tiny_model, train_tokenizer
    from ...train.config import TrainConfig
    from ...train.data import demo_data_path
    from ...output_folder import check_output, clear_owned, record
    from ...train.trainer import Trainer

    if args.output:  # before building anything: never clear a folder the user did not give up
        check_output(args.output, overwrite=args.overwrite, writes=("model", "adapter"))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    records = [json.loads(line) for line in demo_data_path().read_text().splitlines() if line.strip()]
    texts = [f"{r['instruction']} {r['output']}" for r in records]
    with tempfile.TemporaryDirectory(prefix="qlora-demo-") as tmp:
        kept = Path(args.output) if args.output else None
        model_dir, out = (kept / "model", kept / "adapter") if kept else (Path(tmp) / "model", Path(tmp) / "run")
        print(f"1/4 building a small random Llama model and a tokenizer from {len(records)} demo examples "
              "(capitals of 12 countries, each asked 4 ways)")
        tokenizer = train_tokenizer(texts * 4, vocab_size=512)
        # initializer_range 0.1 (not 0.02): the output layer stays frozen and random under QLoRA, and with tiny
        # weights it could not give any token a confident logit, so no adapter could lower the loss far.
        build_tiny_model(Path(tmp) / "model", tokenizer=tokenizer, arch="llama", hidden=128, layers=2, heads=4,
                         kv_heads=2, intermediate=256, seed=0, initializer_range=0.1)
        if kept:  # the base moves in whole, before the adapter's config records its path
            if kept.is_dir():
                clear_owned(kept)
            kept.mkdir(parents=True, exist_ok=True)
            shutil.move(Path(tmp) / "model", model_dir)
            give_default_modes(model_dir)  # safetensors writes 0600; the kept model is for other accounts too
            record(kept, "model", "adapter", command="demo")  # both now: a rerun's --overwrite clears a broken run
        config = TrainConfig(model=str(model_dir), data=str(demo_data_path()), output=str(out),
                             overwrite=True, rank=32, alpha=64, dropout=0.0, lr=args.lr, lr_scheduler="cosine",
                             warmup_steps=5, max_steps=args.steps, batch_size=8, optim="adamw", max_grad_norm=1.0,
                             seq_len=64, logging_steps=max(1, args.steps // 10), progress=False, seed=0)
        trainer = Trainer(config)
        trainer.setup()
        print("2/4 the NF4-quantized base model, adapter disabled (greedy decoding):")
        every = [(r["instruction"], r["output"].rstrip(".")) for r in records]
        with adapters_disabled(trainer.model):
            before = _report(trainer, QUESTIONS)
            before_all = _count(trainer, every)
        print(f"3/4 QLoRA-training the adapter for {args.steps} steps (outputs: {out})")
        original = trainer.metrics.log

        def show(record):
            original(record)
            print(f"  step {record['step']:4d}  loss {record['loss']:.4f}")
        trainer.metrics.log = show
        start = time.perf_counter()
        try:
            trainer.train()
            trainer.save_final()
        finally:
            trainer.cleanup()
        if trainer.losses:
            print(f"  loss: first step {trainer.losses[0]:.4f} -> last step {trainer.losses[-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)")
        print("4/4 the same base model with the trained adapter (greedy decoding):")
        after = _report(trainer, QUESTIONS)
        after_all = _count(trainer, every)
        print(f"base model (adapter disabled): {before}/{len(QUESTIONS)} answers correct "
              f"({before_all}/{len(every)} over all training questions)")
        print(f"QLoRA adapter:                 {after}/{len(QUESTIONS)} answers correct "
              f"({after_all}/{len(every)} over all training questions)")
    if kept:
        print(f"kept in {kept}: try qlora generate --model {model_dir} --adapter {out} --temperature 0 "
              f"--prompt '{QUESTIONS[-1][0]}'")
    else:  # a first run ends saying what comes next, not with a model that is already gone
        print("the model and adapter were temporary: qlora demo --output DIR keeps them, then try qlora generate "
              f"--model DIR/model --adapter DIR/adapter --temperature 0 --prompt '{QUESTIONS[-1][0]}'")
    return 0


def _report(trainer, questions) -> int:
    correct = 0
    for (question, expected), answer in zip(questions, _ask(trainer, [q for q, _ in questions])):
        ok = answer.rstrip(".").strip() == expected
        correct += ok
        print(f"  Q: {question}\n  A: {answer!r}  {'correct' if ok else 'wrong (expected ' + expected + ')'}")
    return correct


def _count(trainer, questions) -> int:
    answers = _ask(trainer, [q for q, _ in questions])
    return sum(answer.rstrip(".").strip() == expected for (_, expected), answer in zip(questions, answers))


def _ask(trainer, questions):
    import torch

    model, tokenizer = trainer.model, trainer.tokenizer
    model.eval()
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(trainer.device), max_new_tokens=12, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        yield tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
