"""--resume with another --max-steps or --epochs continues where the steps trained so far are those of the run of the
new length (the checkpoint within it, the same learning rate at every step so far): the resumed run is then that run
uninterrupted (losses, gradient norms, rates, final adapter), from a finished run or a checkpoint inside one, longer or
shorter. Where the new length changes the steps so far (a schedule that spans the run, a warmup as a share of it,
AdaLoRA's rank schedule) or ends before the checkpoint, the resume is refused naming the option and the change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.train.config import load_config
from qlora.train.trainer import Trainer, list_checkpoints

SFT = [{"instruction": "word " * (1 + 2 * i) + "?", "output": ("x y " * (1 + (5 * i) % 7)).strip()} for i in range(7)]


def _options(model: Path, data: Path, out: Path, **kw) -> dict:
    base = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, batch_size=2,
                progress=False, seq_len=64, save_total_limit=0, dropout=0.1, neftune_alpha=5.0, save_steps=2)
    return base | kw


def _steps(out: Path) -> list[tuple]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if r["split"] == "train"]


CHANGED = {  # the run as started, the run asked for on --resume, the checkpoint resumed from (None: the last)
    "longer after the end": (dict(max_steps=4), dict(max_steps=7), None),
    "a fixed warmup, longer": (dict(max_steps=4, lr_scheduler="constant_with_warmup", warmup_steps=2),
                               dict(max_steps=7, lr_scheduler="constant_with_warmup", warmup_steps=2), None),
    "more epochs": (dict(epochs=1), dict(epochs=2), None),
    "shorter, from inside": (dict(max_steps=8), dict(max_steps=5), 4),
}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_length_that_keeps_the_steps_so_far_resumes_to_that_run(tmp_path, tiny_model_dir, name):
    first, then, cut = CHANGED[name]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    full, part = tmp_path / "full", tmp_path / "part"
    losses = Trainer(load_config(None, _options(tiny_model_dir, data, full, **then))).run()
    Trainer(load_config(None, _options(tiny_model_dir, data, part, **first))).run()
    for later in (c for c in list_checkpoints(part) if cut and int(c.name[5:]) > cut):
        shutil.rmtree(later)
    resumed = Trainer(load_config(None, _options(tiny_model_dir, data, part, resume=True, **then)))
    assert resumed.run() == losses
    assert _steps(part) == _steps(full)
    assert (part / "adapter_model.safetensors").read_bytes() == (full / "adapter_model.safetensors").read_bytes()


REFUSED = {  # the run as started, the flags of the resume, what the refusal says
    "a schedule over the run": (["--lr-scheduler", "cosine"], ["--max-steps", "6"], "would have given step 3"),
    "a warmup share": (["--warmup-ratio", "0.3"], ["--max-steps", "12"], "would have given step 2"),
    "more epochs of a decay": (["--max-steps", "0", "--lr-scheduler", "linear"], ["--max-steps", "0", "--epochs", "2"],
                               "epochs: 1.0 -> 2.0"),
    "ended before the checkpoint": ([], ["--max-steps", "3"], "its checkpoint is at step 4, past the 3 steps"),
    "adalora": (["--adalora", "--adalora-init-r", "4", "--adalora-target-r", "2"], ["--max-steps", "6"],
                "--adalora's rank schedule"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_length_that_changes_the_steps_so_far_is_refused_by_name(tmp_path, tiny_model_dir, capsys, name):
    started, flags, said = REFUSED[name]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "4", "--save-steps", "2", "--no-progress", "--batch-size", "2", *started]
    assert main(argv) == 0
    before = sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*"))
    try:
        code = main(argv + ["--resume", *flags])
    except SystemExit as exc:
        code = exc.code
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and said in err and "Traceback" not in err, err
    assert f"qlora train --adapter {out} --output {out}-continued" in err, err
    assert sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
