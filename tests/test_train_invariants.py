"""Invariants of whole training runs under combinations of options that the other tests leave out.

- resume: a run cut right after a checkpoint and resumed reproduces the uninterrupted run bit for bit
  (losses, eval losses, final adapter) with packing + NEFTune + eval + a warmup schedule + accumulation,
  with text blocks over several epochs + gradient checkpointing, for KTO, and for AdaLoRA cut between two rank
  reallocations (the pruned triplets, importance scores and rank pattern continue);
- determinism: the same seed in another process (another hash seed) gives the same run, another seed does not;
- accumulation with packing: packed rows 2 x 1 and 1 x 2 give the same run.
(tests/test_train_loop.py covers resume per optimizer and accumulation of unpacked SFT, test_preference_training.py
DPO and ORPO resume, tests/test_distributed.py ranks.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.train.config import load_config
from qlora.train.trainer import Trainer, list_checkpoints
from qlora_processes import SRC, train_records

SFT = [{"instruction": "word " * (1 + 2 * i) + "?", "output": ("x y " * (1 + (5 * i) % 7)).strip()} for i in range(7)]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog. " * (1 + i % 3) + f"Number {i}."} for i in range(9)]
PAIRS = [{"prompt": f"Question {i}: " + "word " * i, "chosen": " good" * (1 + i % 3), "rejected": " bad" * (1 + i % 4)}
         for i in range(6)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _options(model: Path, data: Path, out: Path, **kw) -> dict:
    base = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, max_steps=6,
                batch_size=2, progress=False, seq_len=64, save_total_limit=0)
    return base | kw


def _run(opts: dict) -> list[float]:
    return Trainer(load_config(None, opts)).run()


def _eval_losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


RESUMED = {
    "packing-neftune-eval-warmup": ("sft", dict(packing=True, seq_len=128, batch_size=1, grad_accum=2, neftune_alpha=5.0,
                                                dropout=0.1, eval_split=2, eval_steps=2, save_steps=3,
                                                lr_scheduler="linear", warmup_ratio=0.3, optim="paged_adamw_8bit")),
    "text-blocks-epochs-checkpointing": ("texts", dict(group_texts=3, seq_len=16, max_steps=0, epochs=2, save_steps=2,
                                                      dropout=0.1, gradient_checkpointing=True)),
    "adalora-pruning": ("sft", dict(adalora=True, adalora_init_r=4, adalora_target_r=2, adalora_tinit=1,
                                    adalora_tfinal=2, save_steps=3, dropout=0.1)),
    "kto-accumulation": ("pairs", dict(method="kto", dropout=0.1, grad_accum=2, save_steps=2, eval_split=2,
                                       eval_steps=2)),
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_resume_after_a_checkpoint_reproduces_the_uninterrupted_run(tmp_path, tiny_model_dir, name):
    kind, kw = RESUMED[name]
    data = _write(tmp_path / "d.jsonl", {"sft": SFT, "texts": TEXTS, "pairs": PAIRS}[kind])
    full, part = tmp_path / "full", tmp_path / "part"
    losses = _run(_options(tiny_model_dir, data, full, **kw))
    checkpoints = list_checkpoints(full)
    assert len(losses) >= 6 and len(checkpoints) >= 2
    shutil.copytree(full, part)  # as if killed right after the first checkpoint, mid-schedule and mid-epoch
    for later in list_checkpoints(part)[1:]:
        shutil.rmtree(later)
    (part / "adapter_model.safetensors").unlink()
    assert _run(_options(tiny_model_dir, data, part, resume=True, **kw)) == losses
    assert [r["step"] for r in train_records(part)] == list(range(1, len(losses) + 1))
    assert _eval_losses(part) == _eval_losses(full)
    _assert_same_adapter(part, full)


def test_the_same_seed_in_another_process_is_the_same_run_and_another_seed_is_not(tmp_path, tiny_model_dir):
    """Dropout, NEFTune noise, LoRA initialization, data order and packing follow --seed alone: not the
    process (another hash seed, so other set iteration orders) nor anything else of it."""
    data = _write(tmp_path / "d.jsonl", SFT)
    opts = _options(tiny_model_dir, data, tmp_path / "here", dropout=0.1, neftune_alpha=5.0, packing=True,
                    seq_len=128, batch_size=1, grad_accum=2, max_steps=4)
    here = _run(opts)
    other_seed = _run(opts | {"output": str(tmp_path / "seed"), "seed": 43})
    argv = [sys.executable, "-m", "qlora", "train"]
    for key, value in (opts | {"output": str(tmp_path / "there")}).items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") == "0" else "0"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(here) == 4 and [r["loss"] for r in train_records(tmp_path / "there")] == here
    _assert_same_adapter(tmp_path / "there", tmp_path / "here")
    assert all(abs(x - y) > 1e-4 for x, y in zip(here[1:], other_seed[1:]))


def test_accumulated_packed_rows_equal_one_batch_of_them(tmp_path, tiny_model_dir):
    """Packed rows of different lengths (and trained tokens): 2 rows x accumulation 1 == 1 row x accumulation 2,
    the loss normalized over the step's tokens in both."""
    data = _write(tmp_path / "d.jsonl", SFT)
    runs = {}
    for bs, accum in ((2, 1), (1, 2)):
        out = tmp_path / f"{bs}x{accum}"
        runs[bs] = _run(_options(tiny_model_dir, data, out, packing=True, seq_len=96, batch_size=bs, grad_accum=accum,
                                 dropout=0.0, max_steps=4)), out
    trainer = Trainer(load_config(None, _options(tiny_model_dir, data, tmp_path / "probe", packing=True, seq_len=96)))
    trainer.setup()
    rows = trainer.train_units
    trainer.cleanup()
    assert len(rows) < len(SFT) and len({r.labels.count(-100) for r in rows}) > 1  # packed, unequal rows
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[2][0]), rtol=1e-5, atol=1e-6)
    grad_norms = [[r["grad_norm"] for r in train_records(out)] for _, out in runs.values()]
    torch.testing.assert_close(torch.tensor(grad_norms[0]), torch.tensor(grad_norms[1]), rtol=1e-5, atol=1e-7)
    a, b = (load_file(str(out / "adapter_model.safetensors")) for _, out in runs.values())
    # 4 Adam steps at lr 1e-2 normalize near-zero gradients, magnifying their float noise (the two runs' matrix
    # products have other row counts): with MKL's AVX-512 kernels one of an adapter's 1024 elements differs by
    # 4.4e-5 (1e-5 passed with its AVX2 kernels; losses and gradient norms still agree to 1e-5)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=6e-5)


def _records(out: Path) -> list[dict]:
    """metrics.jsonl less the wall-clock fields."""
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "gpu_mem_gib")} for r in rows]


def test_resume_after_the_last_checkpoint_logs_the_final_evaluation_once(tmp_path, tiny_model_dir):
    """The last step is checkpointed before the final evaluation (not on an --eval-steps step) runs: a run killed
    after that evaluation, while the adapter is written, or resumed once it finished, evaluates again, and
    metrics.jsonl still reads as the uninterrupted run, one record per evaluation."""
    data = _write(tmp_path / "d.jsonl", SFT)
    kw = dict(eval_split=2, eval_steps=4, dropout=0.1)
    full, killed = tmp_path / "full", tmp_path / "killed"
    _run(_options(tiny_model_dir, data, full, **kw))
    assert [r["step"] for r in _records(full) if r["split"] == "eval"] == [4, 6]
    expected = _records(full)
    shutil.copytree(full, killed)
    (killed / "adapter_model.safetensors").unlink()  # killed while the final adapter was written
    for out in (killed, full):  # and a finished run resumed
        _run(_options(tiny_model_dir, data, out, resume=True, **kw))
        assert _records(out) == expected and (out / "adapter_model.safetensors").is_file()
    _assert_same_adapter(killed, full)


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tmp_path, tiny_model_dir):
    """A run killed steps after its checkpoint had logged those steps to TensorBoard too: the resumed run hides
    them there (as metrics.jsonl drops them), so the loss curve reads as the uninterrupted run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _write(tmp_path / "d.jsonl", SFT)
    full, killed = tmp_path / "full", tmp_path / "killed"
    kw = dict(save_steps=2, max_steps=5)
    losses = _run(_options(tiny_model_dir, data, full, **kw))
    shutil.copytree(full, killed)  # as if killed after step 5 had been logged: steps 3 .. 5 are run again
    for later in list_checkpoints(killed)[1:]:
        shutil.rmtree(later)
    (killed / "adapter_model.safetensors").unlink()
    assert _run(_options(tiny_model_dir, data, killed, resume=True, **kw)) == losses
    events = EventAccumulator(str(killed / "events"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert shown == [(step, pytest.approx(loss)) for step, loss in enumerate(losses, 1)]


@pytest.mark.parametrize("counted", [True, False], ids=["checkpoint", "checkpoint-without-record-count"])
def test_resume_after_a_kill_mid_record_reads_the_records_before_it(tmp_path, tiny_model_dir, counted):
    """A run killed (or out of disk) while writing a metrics.jsonl record leaves its last line cut: --resume
    drops it with the other records past the checkpoint instead of failing on it (also from a checkpoint
    written before checkpoints counted the records)."""
    data = _write(tmp_path / "d.jsonl", SFT)
    full, killed = tmp_path / "full", tmp_path / "killed"
    kw = dict(save_steps=2, max_steps=4)
    losses = _run(_options(tiny_model_dir, data, full, **kw))
    shutil.copytree(full, killed)
    shutil.rmtree(list_checkpoints(killed)[-1])
    (killed / "adapter_model.safetensors").unlink()
    if not counted:
        state_file = list_checkpoints(killed)[-1] / "trainer_state.pt"
        state = torch.load(state_file, weights_only=True)
        del state["metric_records"]
        torch.save(state, state_file)
    with open(killed / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 5, "lo')
    assert _run(_options(tiny_model_dir, data, killed, resume=True, **kw)) == losses
    assert _records(killed) == _records(full)
