"""Epoch-aligned optimizer steps, as transformers' Trainer (hence TRL, Unsloth, LLaMA-Factory, axolotl) counts them.

An epoch of N units has ceil(N / (batch x accum)) steps, its last one short, and a run ceil(epochs x that) steps.
The oracle is transformers' own training loop on a one-parameter model: how many optimizer steps it takes and how
many examples each step sees. On qlora's side: the steps of a set-up run, the units each step takes, what one
epoch trains, accumulation equivalence and resume across an epoch's end (N not a multiple of the step's units).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.train.config import load_config
from qlora.train.trainer import Trainer, list_checkpoints
from qlora_processes import train_records

ROWS = [{"instruction": "word " * (1 + i % 5) + f"{i}?", "output": ("x y " * (1 + (3 * i) % 5)).strip()}
        for i in range(13)]


def _transformers_steps(n: int, batch: int, accum: int, epochs: float, max_steps: int, tmp: Path) -> list[int]:
    """Examples each optimizer step of transformers' Trainer sees, for n examples (CPU, one parameter)."""
    from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments

    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = 0

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            self.seen += x.shape[0]
            return {"loss": (self.w * x.float()).sum()}

    class PerStep(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(model.seen)

    model, per_step = Counter(), PerStep()
    args = TrainingArguments(str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             num_train_epochs=epochs, max_steps=max_steps or -1, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = HFTrainer(model=model, args=args, train_dataset=[{"x": i} for i in range(n)], callbacks=[per_step])
    trainer.train()
    assert trainer.state.global_step == len(per_step.ends)
    return [b - a for a, b in zip([0] + per_step.ends, per_step.ends)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _options(model: Path, data: Path, out: Path, **kw) -> dict:
    return dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, progress=False,
                seq_len=64, dropout=0.0, save_total_limit=0, max_steps=0) | kw


def _set_up(tiny_model_dir: Path, tmp_path: Path, n: int, **kw) -> Trainer:
    data = _write(tmp_path / f"d{n}.jsonl", ROWS[:n])
    trainer = Trainer(load_config(None, _options(tiny_model_dir, data, tmp_path / "probe", **kw)))
    trainer.setup()
    trainer.cleanup()
    assert len(trainer.train_units) == n
    return trainer


@pytest.mark.parametrize("n, batch, accum, epochs, max_steps", [
    (13, 2, 2, 3, 0),     # 4 steps an epoch, the last of one example: transformers 12, a stream of epochs 10
    (13, 4, 1, 1, 0),
    (7, 2, 3, 2.5, 0),    # fractional epochs: ceil(2.5 x 2)
    (13, 3, 2, 0.4, 0),   # less than an epoch
    (5, 2, 1, 1, 7),      # --max-steps on into further epochs, each ending with a short step
])
def test_steps_are_those_of_transformers_trainer(tmp_path, tiny_model_dir, n, batch, accum, epochs, max_steps):
    want = _transformers_steps(n, batch, accum, epochs, max_steps, tmp_path / "hf")
    trainer = _set_up(tiny_model_dir, tmp_path, n, batch_size=batch, grad_accum=accum, epochs=epochs,
                      max_steps=max_steps)
    assert trainer.total_steps == len(want)
    assert [len(trainer.step_units(s)) for s in range(trainer.total_steps)] == want


def test_one_epoch_trains_every_example_exactly_once(tmp_path, tiny_model_dir):
    """Each example's tokens appear in exactly one row of the epoch's micro-batches (13 = 2 x 6 + 1 examples)."""
    trainer = _set_up(tiny_model_dir, tmp_path, 13, batch_size=2, grad_accum=3, epochs=1)
    assert trainer.total_steps == 3
    seen = []
    for step in range(trainer.total_steps):
        for batch in trainer.micro_batches(step):
            for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
                seen.append(tuple(t for t, m in zip(ids, mask) if m))
    assert sorted(seen) == sorted(tuple(u.input_ids) for u in trainer.train_units)
    assert len(set(seen)) == 13


def _records(out: Path, key: str) -> torch.Tensor:
    return torch.tensor([r[key] for r in train_records(out)])


def test_accumulation_splits_equal_across_an_epoch_end(tmp_path, tiny_model_dir):
    """4 x 1 == 2 x 2 == 1 x 4 over 2 epochs of 5 examples: steps of 4 then 1 example, the short one split
    into one micro-batch of 1 (and, for 2 x 2, of fewer micro-batches)."""
    data = _write(tmp_path / "d.jsonl", ROWS[:5])
    outs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{batch}x{accum}"
        losses = Trainer(load_config(None, _options(tiny_model_dir, data, out, batch_size=batch, grad_accum=accum,
                                                    epochs=2))).run()
        assert len(losses) == 4  # 2 steps an epoch; a stream of epochs would take 3 steps of 4
        outs.append(out)
    for out in outs[1:]:
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(_records(out, key), _records(outs[0], key), rtol=1e-5, atol=1e-6)
        a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(outs[0] / "adapter_model.safetensors"))
        for key in a:  # Adam's normalized updates magnify float noise in near-zero gradients to ~1e-5
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_resume_across_an_epoch_end_is_bit_identical(tmp_path, tiny_model_dir):
    """5 examples, batch 2: 3 steps an epoch (2, 2, 1 examples); resumed after step 2, the run goes through
    the short step 3 into the second epoch and reproduces the uninterrupted one bit for bit."""
    data = _write(tmp_path / "d.jsonl", ROWS[:5])
    full, part = tmp_path / "full", tmp_path / "part"
    opts = _options(tiny_model_dir, data, full, batch_size=2, epochs=2, save_steps=2, dropout=0.1,
                    lr_scheduler="cosine", warmup_steps=1)
    losses = Trainer(load_config(None, opts)).run()
    assert len(losses) == 6
    shutil.copytree(full, part)
    for later in list_checkpoints(part)[1:]:
        shutil.rmtree(later)
    (part / "adapter_model.safetensors").unlink()
    assert list_checkpoints(part)[-1].name == "step-0000002"
    assert Trainer(load_config(None, opts | {"output": str(part), "resume": True})).run() == losses
    assert [r["step"] for r in train_records(part)] == list(range(1, 7))
    a, b = load_file(str(part / "adapter_model.safetensors")), load_file(str(full / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_reports_its_epoch_aligned_steps(tmp_path, tiny_model_dir, capsys):
    """The data line, the schedule and the logged steps agree: 13 examples, batch 4, 1.5 epochs = ceil(1.5 x 4)."""
    data = _write(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    trainer = Trainer(load_config(None, _options(tiny_model_dir, data, out, batch_size=4, epochs=1.5,
                                                 lr_scheduler="linear", warmup_ratio=0.0)))
    assert len(trainer.run()) == 6
    assert "13 examples, 6 steps" in capsys.readouterr().out
    assert [r["step"] for r in train_records(out)] == list(range(1, 7))
    assert trainer.scheduler.get_last_lr()[0] == 0.0  # linear decay reaches 0 at the run's last step
