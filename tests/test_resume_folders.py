"""--resume on a folder it cannot continue refuses in one paragraph that says how to go on, without a traceback and
without touching the folder: a last checkpoint damaged after it was written (a copy cut short, a file deleted) names
the file and the checkpoint before it, from which the run then resumes to the uninterrupted run's adapter; a
checkpoint folder given as --output names the run's folder; an adapter without checkpoints (PEFT's, or a run that
saved none), checkpoints whose state was deleted and a transformers Trainer's output name the command that continues
their adapter, not --overwrite, which would delete it. A user's copy of a checkpoint beside the others is not taken
for one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.train.trainer import list_checkpoints

from cli_exit import cli_exit

SFT = [{"instruction": "word " * (1 + 2 * i) + "?", "output": ("x y " * (1 + (5 * i) % 7)).strip()} for i in range(7)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> tuple[list[str], Path]:
    """A finished 4-step run with checkpoints at steps 2 and 4: its command line (less --output) and folder."""
    root = tmp_path_factory.mktemp("run")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--optim", "adamw", "--max-steps", "4",
            "--save-steps", "2", "--save-total-limit", "0", "--no-progress", "--dropout", "0.1"]
    assert main(argv + ["--output", str(root / "o")]) == 0
    return argv, root / "o"


def _cut(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _overwritten(data: bytes) -> bytes:  # other bytes in the pickle a torch.save archive opens with
    return data[:200] + b"\xff" * 16 + data[216:]


DAMAGES = {  # how the last checkpoint was damaged: its file, and what happened to it (None: deleted)
    "state cut short": ("trainer_state.pt", _cut),
    "state overwritten": ("trainer_state.pt", _overwritten),
    "adapter cut short": ("adapter/adapter_model.safetensors", _cut),
    "adapter deleted": ("adapter/adapter_model.safetensors", None),
    "run config cut short": ("run_config.json", _cut),
}


@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_a_damaged_last_checkpoint_is_named_and_the_one_before_resumes(tmp_path, finished, capsys, how):
    argv, full = finished
    out = tmp_path / "o"
    shutil.copytree(full, out)
    (out / "adapter_model.safetensors").unlink()  # as if killed after the last checkpoint
    name, damage = DAMAGES[how]
    last = list_checkpoints(out)[-1]
    if damage is None:
        (last / name).unlink()
    else:
        (last / name).write_bytes(damage((last / name).read_bytes()))
    before = sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*"))
    code, err = cli_exit(argv + ["--output", str(out), "--resume"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{name} " in err and "step-0000004" in err and "step-0000002 (step 2)" in err, err
    assert sorted((p.relative_to(out), p.stat().st_size) for p in out.rglob("*")) == before  # nothing touched
    shutil.rmtree(last)  # as the refusal says
    code, err = cli_exit(argv + ["--output", str(out), "--resume"], capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() == (full / "adapter_model.safetensors").read_bytes()


def test_the_only_checkpoint_damaged_says_to_start_again(tmp_path, finished, capsys):
    argv, full = finished
    out = tmp_path / "o"
    shutil.copytree(full, out)
    (out / "adapter_model.safetensors").unlink()
    shutil.rmtree(list_checkpoints(out)[-1])
    (list_checkpoints(out)[-1] / "trainer_state.pt").write_bytes(b"PK\x03\x04")
    code, err = cli_exit(argv + ["--output", str(out), "--resume"], capsys)
    assert code == 2 and "trainer_state.pt" in err and "only checkpoint" in err and "--overwrite" in err, err


def _peft_folder(full: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(full / name, to / name)
    return to


def _trainer_output(full: Path, to: Path) -> Path:
    for step in (2, 4):
        _peft_folder(full, to / f"checkpoint-{step}")
        (to / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return to


def _stateless(full: Path, to: Path) -> Path:
    shutil.copytree(full, to)
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # stopped before its end
        (to / name).unlink()
    for checkpoint in list_checkpoints(to):
        (checkpoint / "trainer_state.pt").unlink()  # as to save space
    return to


FOLDERS = {  # --output given -> what the refusal names
    "checkpoints without their state": (
        lambda full, tmp: _stateless(full, tmp / "run"),
        lambda full, tmp: f"qlora train --adapter {tmp / 'run/checkpoints/step-0000004/adapter'} --output "
                          f"{tmp / 'run-continued'}"),
    "a checkpoint": (lambda full, tmp: list_checkpoints(full)[0], lambda full, tmp: f"--output {full}"),
    "a PEFT adapter": (lambda full, tmp: _peft_folder(full, tmp / "peft"),
                       lambda full, tmp: f"qlora train --adapter {tmp / 'peft'} --output {tmp / 'peft-continued'}"),
    "a transformers Trainer's output": (
        lambda full, tmp: _trainer_output(full, tmp / "hf"),
        lambda full, tmp: f"qlora train --adapter {tmp / 'hf' / 'checkpoint-4'} --output {tmp / 'hf-continued'}"),
}


@pytest.mark.parametrize("kind", sorted(FOLDERS))
def test_a_folder_with_no_run_to_resume_says_how_to_go_on(tmp_path, finished, capsys, kind):
    argv, full = finished
    make, named = FOLDERS[kind]
    out = make(full, tmp_path)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err = cli_exit(argv + ["--output", str(out), "--resume"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert named(full, tmp_path) in " ".join(err.split()) and "--overwrite" not in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    if "adapter" in named(full, tmp_path):  # the command it names trains
        command = named(full, tmp_path).split()[2:]
        assert main(argv[:-2] + command + ["--max-steps", "1"]) == 0  # less --dropout: the adapter brings its own


def test_a_copy_beside_the_checkpoints_is_neither_resumed_from_nor_rotated_away(tmp_path, finished, capsys):
    """``cp -r step-0000002 step-0000002.bak`` in the checkpoints folder: the run resumes from its newest checkpoint
    to the uninterrupted run's adapter, and rotating checkpoints (--save-total-limit 1) keeps the user's copy."""
    argv, full = finished
    out = tmp_path / "o"
    shutil.copytree(full, out)
    (out / "adapter_model.safetensors").unlink()
    shutil.rmtree(list_checkpoints(out)[-1])
    copy = out / "checkpoints" / "step-0000002.bak"
    shutil.copytree(list_checkpoints(out)[-1], copy)
    code, err = cli_exit(argv + ["--output", str(out), "--resume", "--save-total-limit", "1"], capsys)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").read_bytes() == (full / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in list_checkpoints(out)] == ["step-0000004"] and (copy / "trainer_state.pt").is_file()
