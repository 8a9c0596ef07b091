"""Weight decay's exemptions: the parameters transformers' ``Trainer`` leaves undecayed (biases, norm weights) are
those qlora leaves undecayed, on every tiny architecture; a run that trains biases resumes to its uninterrupted
losses, and a checkpoint from before the exemptions resumes as it began (its optimizer had one group).
(The whole run against transformers' Trainer with trained biases: tests/test_whole_run_reference.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer as HFTrainer

from qlora.model.tiny import ARCHITECTURES, build_tiny_model
from qlora.optim import decay_groups, no_decay_names
from qlora.train.config import load_config
from qlora.train.trainer import Trainer, list_checkpoints


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_undecayed_parameters_are_transformers_own(tmp_path, tiny_tokenizer, arch):
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path, tokenizer=tiny_tokenizer, arch=arch))
    names = {n for n, _ in model.named_parameters()}
    theirs = names - set(HFTrainer.get_decay_parameter_names(None, model))
    assert no_decay_names(model) == theirs and theirs and names - theirs


def test_groups_split_in_order_and_without_decay_stay_whole():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    a, b = [{"params": list(model[0].parameters()), "lr": 1.0}], [{"params": list(model[1:].parameters()), "lr": 2.0}]
    groups = decay_groups(model, a + b, 0.1)
    assert [(g["lr"], g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in groups] == [
        (1.0, 0.1, [(4, 3)]), (1.0, 0.0, [(4,)]), (2.0, 0.1, [(2, 4)]), (2.0, 0.0, [(4,), (4,)])]
    assert decay_groups(model, a + b, 0.0) == a + b


def _config(model, data, out, **kw):
    return load_config(None, dict(model=str(model), data=str(data), output=str(out), quant="none", optim="adamw",
                                  lr=1e-2, weight_decay=0.5, bias="all", lora_bias=True, train_on="all", max_steps=6,
                                  save_steps=3, batch_size=2, seq_len=64, progress=False, dropout=0.0) | kw)


def test_a_run_training_biases_resumes_to_its_losses_and_an_older_checkpoint_as_it_began(tmp_path, tiny_tokenizer,
                                                                                          caplog):
    model = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, attention_bias=True)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox " * (1 + i % 4)}) + "\n" for i in range(9)))
    full = Trainer(_config(model, data, tmp_path / "full"))
    losses = full.run()
    assert [g["weight_decay"] for g in full.optimizer.param_groups] == [0.5, 0.0]
    assert all(n.endswith("bias") for n, p in full.model.named_parameters()
               if any(p is q for q in full.optimizer.param_groups[1]["params"]))
    for out, older in ((tmp_path / "part", False), (tmp_path / "older", True)):
        first = Trainer(_config(model, data, out))
        first._decay_all = older  # as an older qlora built it: one group, the biases decayed too
        first.setup()
        first.total_steps = 3  # stopped right after the step-3 checkpoint
        first.train()
        first.cleanup()
        if older:  # and wrote no record of the split
            run_config = list_checkpoints(out)[-1] / "run_config.json"
            saved = json.loads(run_config.read_text())
            del saved["no_decay_groups"]
            run_config.write_text(json.dumps(saved))
        caplog.clear()
        resumed = Trainer(_config(model, data, out, resume=True))
        got = resumed.run()
        assert got == losses or older and len(got) == 6 and got[:3] != losses[:3], (got, losses)
        assert ("decayed every trained parameter" in caplog.text) == older
        assert len(resumed.optimizer.param_groups) == (1 if older else 2)
        later = json.loads((list_checkpoints(out)[-1] / "run_config.json").read_text())
        assert later["no_decay_groups"] is not older  # its next resume is built the same way again
