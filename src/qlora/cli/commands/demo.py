"""``qlora demo``: the whole method in a few minutes on a laptop CPU, no download.

Builds a small Llama-architecture model and a tokenizer from the instruction
data shipped with qlora, quantizes the model to NF4, QLoRA-trains an adapter on
that data (the loss is printed as it falls), then asks it some of the questions
with greedy decoding, with and without the adapter, so the effect is visible.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

NAME = "demo"
HELP = "build, QLoRA-train and query a tiny model in minutes on a CPU"

QUESTIONS = ("What is the capital of France?", "What is the capital of Italy?", "What is the capital of Japan?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    parser.add_argument("--output", default=None, help="keep the run here (default: a temporary folder)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ...model.tiny import build_tiny_model, train_tokenizer
    from ...train.config import TrainConfig
    from ...train.data import demo_data_path
    from ...train.trainer import Trainer

    torch.manual_seed(0)
    records = [json.loads(line) for line in demo_data_path().read_text().splitlines() if line.strip()]
    texts = [f"{r['instruction']} {r['output']}" for r in records]
    with tempfile.TemporaryDirectory(prefix="qlora-demo-") as tmp:
        out = Path(args.output) if args.output else Path(tmp) / "run"
        print(f"1/3 building a small Llama model and tokenizer from {len(records)} demo examples")
        tokenizer = train_tokenizer(texts * 4, vocab_size=512)
        build_tiny_model(Path(tmp) / "model", tokenizer=tokenizer, arch="llama", hidden=192, layers=2, heads=4,
                         kv_heads=2, intermediate=384)
        print(f"2/3 NF4-quantizing it and QLoRA-training an adapter for {args.steps} steps (outputs: {out})")
        config = TrainConfig(model=str(Path(tmp) / "model"), data=str(demo_data_path()), output=str(out),
                             overwrite=True, rank=64, alpha=128, dropout=0.0, lr=3e-3, lr_scheduler="cosine",
                             max_steps=args.steps, batch_size=8, optim="adamw", max_grad_norm=1.0,
                             seq_len=128, logging_steps=10, progress=False)
        trainer = Trainer(config)
        trainer.setup()
        original = trainer.metrics.log

        def show(record):
            original(record)
            print(f"  step {record['step']:4d}  loss {record['loss']:.4f}")
        trainer.metrics.log = show
        try:
            trainer.train()
            trainer.save_final()
        finally:
            trainer.cleanup()
        print("3/3 asking the fine-tuned model (greedy decoding):")
        for question, answer in _ask(trainer, QUESTIONS):
            print(f"  Q: {question}\n  A: {answer}")
    return 0


def _ask(trainer, questions):
    import torch

    model, tokenizer = trainer.model, trainer.tokenizer
    model.eval()
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        yield question, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
