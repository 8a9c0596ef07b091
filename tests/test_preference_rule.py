"""A preference run teaches a tiny 4-bit model a rule its base does not know.

The rule: after a prompt that ends with an animal, answer with that animal's
sound (" meow" after a cat, " woof" after a dog); the rejected answer is the
other sound. The random base follows it for no prompt. DPO and ORPO each train
an adapter for 30 steps; the reward accuracy rises from chance to above 0.9,
and greedy decoding then answers with the right sound, also for phrasings held
out of training (the eval set).
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora.model.inject import adapters_disabled
from qlora.model.tiny import build_tiny_model, train_tokenizer
from qlora.train.config import load_config
from qlora.train.trainer import Trainer

SOUNDS = {"cat": " meow", "dog": " woof"}
TRAIN = ["What says the {}", "The sound of a {}", "Hear the {}", "A call of the {}", "Which sound, {}",
         "Speak like a {}", "Listen to the {}", "Our pet {}"]
HELD_OUT = ["Tell me about the {}", "Noise of the {}"]


def _rows(templates):
    return [{"prompt": t.format(animal), "chosen": sound, "rejected": other}
            for t in templates for animal, sound in SOUNDS.items() for other in SOUNDS.values() if other != sound]


def _follows_rule(trainer, pairs) -> int:
    """Pairs whose greedy continuation starts with the chosen sound."""
    model, tok = trainer.model, trainer.tokenizer
    model.eval()
    hits = 0
    for p in pairs:
        ids = torch.tensor([p.prompt_ids])
        answer = p.chosen_ids[:-1]  # the sound, without its EOS
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer),
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        hits += out[0, ids.shape[1]:].tolist() == answer
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_training_teaches_a_rule_the_base_does_not_know(tmp_path, method):
    train, held = _rows(TRAIN), _rows(HELD_OUT)
    texts = [r["prompt"] + r[k] for r in train + held for k in ("chosen", "rejected")]
    model_dir = build_tiny_model(tmp_path / "base", tokenizer=train_tokenizer(texts * 10, vocab_size=300))
    for name, rows in (("train", train), ("held", held)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, dict(
        model=str(model_dir), data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "held.jsonl"),
        output=str(tmp_path / "out"), method=method, beta=0.1, lr=5e-3, max_steps=30, batch_size=4, rank=8,
        alpha=16, dropout=0.0, warmup_steps=0, max_grad_norm=1.0, optim="adamw", seq_len=32, progress=False))
    trainer = Trainer(config)
    trainer.setup()
    with adapters_disabled(trainer.model):
        assert _follows_rule(trainer, trainer.train_units) == 0
        assert _follows_rule(trainer, trainer.eval_units) == 0
    try:
        trainer.train()
        trainer.save_final()
    finally:
        trainer.cleanup()

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["rewards/accuracies"] for r in records if r["split"] == "train"]
    assert len(accuracy) == 30
    # chance at the start (DPO's very first step ties every pair: policy == reference, rewards 0)
    early = accuracy[1:5] if method == "dpo" else accuracy[:4]
    assert 0.2 <= sum(early) / len(early) <= 0.8, accuracy
    assert sum(accuracy[-5:]) / 5 > 0.9, accuracy
    final_eval = [r for r in records if r["split"] == "eval"][-1]
    assert final_eval["rewards/accuracies"] > 0.9 and final_eval["rewards/margins"] > 0
    assert _follows_rule(trainer, trainer.train_units) == len(trainer.train_units)
    assert _follows_rule(trainer, trainer.eval_units) >= 0.9 * len(trainer.eval_units)
