"""The first optimizer step of a training run against a reference computed by hand, option by option.

The reference shares nothing with qlora's training code: the model is transformers' own, its 4-bit layers
decoded from bitsandbytes' quantization (its portable decoder), the adapter PEFT's ``PeftModel`` loaded from
the adapter qlora saved (its B matrices made non-zero, so that A gets a gradient too), each unit of the step
(an example, a packed example, a text block) run alone, the loss summed over every trained token of the
whole step and divided by their number (README "Data"; not a mean of micro-batch means), the gradient
clipped by its global norm, and torch's ``AdamW`` stepped at the schedule's first rate from
``transformers.get_scheduler``. LoRA+ groups are qlora's (B matrices at the ratio, everything else, DoRA
magnitudes and biases too, at ``--lr``; PEFT's ``create_loraplus_optimizer`` gives 1-D parameters the B rate).
Each case combines options the other training tests leave apart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, get_scheduler  # noqa: E402

from qlora.model.adapter_io import save_adapter  # noqa: E402
from qlora.model.tiny import build_tiny_model  # noqa: E402
from qlora.train.config import load_config  # noqa: E402
from qlora.train.data import IGNORE_INDEX  # noqa: E402
from qlora.train.trainer import Trainer  # noqa: E402
from bnb_decoded import decode_quantized_layers  # noqa: E402
from random_adapters import randomize_lora_b  # noqa: E402

WORDS = "alpha beta gamma delta fox dog lazy quick brown paged optimizer memory".split()


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


DATA = {
    "alpaca": [{"instruction": _words(i, 1 + i % 9), "output": _words(i + 1, 1 + (5 * i) % 11)} for i in range(9)]
    + [{"instruction": "an empty answer", "output": ""}],  # skipped: no trained token
    "chat": [{"messages": [{"role": "user", "content": _words(i, 2 + i % 4)},
                           {"role": "assistant", "content": _words(i + 2, 1 + i % 6)},
                           {"role": "user", "content": _words(i + 3, 2)},
                           {"role": "assistant", "content": _words(i + 4, 1 + i % 3), **({"weight": 0} if i % 3 == 0 else {})}]}
             for i in range(8)],
    "prompt-completion": [{"prompt": _words(i, 1 + i % 7), "completion": _words(i + 5, 1 + (3 * i) % 8)}
                          for i in range(8)],
    "text": [{"text": _words(i, 3 + (7 * i) % 20)} for i in range(10)],
}

# name: (architecture, its config overrides, the run's options; "last": take the epoch's last, short step)
CASES = {
    "nf4-dora-rslora-loraplus-decay-clip-accum-chunked": (
        "llama", {}, dict(data="alpaca", quant="nf4", double_quant=True, blocksize=128, dora=True, rslora=True,
                          lora_plus_ratio=16.0, weight_decay=0.1, max_grad_norm=1e-3, batch_size=2, grad_accum=2,
                          chunked_ce=True, seq_len=24)),
    "softcapped-windowed-tied-packing-accum": (
        "gemma2", dict(sliding_window=5, tie_word_embeddings=True),
        dict(data="chat", quant="none", packing=True, seq_len=64, batch_size=1, grad_accum=3, train_on="all",
             max_grad_norm=0.0)),
    "fp4-text-blocks-last-short-step": (
        "qwen2", {}, dict(data="text", quant="fp4", double_quant=False, blocksize=32, group_texts=4, seq_len=8,
                          max_steps=0, epochs=1, batch_size=4, grad_accum=2, lr_scheduler="cosine", last=True)),
    "conv1d-biases-checkpointing-completion": (
        "gpt2", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        dict(data="prompt-completion", quant="nf4", double_quant=False, blocksize=64, bias="all", lora_bias=True,
             gradient_checkpointing=True, train_on="completion", weight_decay=0.1, batch_size=3, grad_accum=2,
             lr_scheduler="linear", max_steps=3)),
}


def _reference_model(model_dir: Path, trainer: Trainer, opts: dict, adapter: Path) -> peft.PeftModel:
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if opts["quant"] != "none":
        decode_quantized_layers(plain, trainer.model, opts["quant"], opts["blocksize"], opts["double_quant"])
    return peft.PeftModel.from_pretrained(plain, adapter, is_trainable=True).train()


def _units(batch: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, labels) of each unit of a micro-batch: padding cut off, packed rows cut where positions restart."""
    units = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if "position_ids" in batch:
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [len(ids)]
            units += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
        else:
            n = int(batch["attention_mask"][row].sum())
            units.append((ids[:n], labels[:n]))
    return units


@pytest.mark.parametrize("case", sorted(CASES))
def test_first_step_equals_a_reference_computed_by_hand(tmp_path, tiny_tokenizer, case):
    arch, overrides, opts = CASES[case]
    opts = dict(optim="adamw", lr=1e-2, rank=4, alpha=8, dropout=0.0, warmup_ratio=0.0, adam_beta1=0.8,
                adam_beta2=0.95, adam_epsilon=1e-4, max_steps=1, shuffle=True, seed=3, progress=False,
                save_total_limit=0, output=str(tmp_path / "run")) | opts
    last = opts.pop("last", False)
    model_dir = build_tiny_model(tmp_path / "model", tokenizer=tiny_tokenizer, arch=arch, **overrides)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA[opts.pop("data")]))
    trainer = Trainer(load_config(None, opts | dict(model=str(model_dir), data=str(data))))
    trainer.setup()
    randomize_lora_b(trainer.model, seed=1)
    save_adapter(trainer.model, tmp_path / "adapter")
    if last:
        trainer.step = trainer.total_steps - 1
        assert len(trainer.step_units(trainer.step)) % trainer.global_batch % opts["batch_size"]  # a short micro-batch
    batches = trainer.micro_batches(trainer.step)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    record = trainer.train_step()
    after = dict(trainer.model.named_parameters())
    trainer.cleanup()

    reference = _reference_model(model_dir, trainer, opts, tmp_path / "adapter")
    params = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    assert params.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in params.items())
    losses, tokens = [], 0
    for batch in batches:
        for ids, labels in _units(batch):
            logits = reference(input_ids=ids[None]).logits[0, :-1].float()
            losses.append(F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((labels[1:] != IGNORE_INDEX).sum())
    loss = torch.stack(losses).sum() / tokens
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), opts.get("max_grad_norm", 0.3) or math.inf)
    schedule = {"constant": "constant_with_warmup"}.get(opts.get("lr_scheduler", "constant"),
                                                          opts.get("lr_scheduler", "constant"))
    rate = opts["lr"] * get_scheduler(schedule, torch.optim.SGD([torch.zeros(1)], lr=1.0), num_warmup_steps=0,
                                      num_training_steps=trainer.total_steps).get_last_lr()[0]
    ratio = opts.get("lora_plus_ratio", 1.0)
    groups = [dict(params=[p for n, p in params.items() if "lora_B" not in n], lr=rate),
              dict(params=[p for n, p in params.items() if "lora_B" in n], lr=rate * ratio)]
    torch.optim.AdamW(groups, betas=(opts["adam_beta1"], opts["adam_beta2"]), eps=opts["adam_epsilon"],
                      weight_decay=opts.get("weight_decay", 0.0)).step()

    assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert record["lr"] == pytest.approx(rate)
    for name, p in params.items():
        expected, ours = p.detach() - before[name], after[name].detach() - before[name]
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3 * expected.abs().max().item(), msg=name)
