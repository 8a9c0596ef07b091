"""Output folders: --overwrite never deletes user data; failed writes are clean, one-line errors.

Every command that writes a folder (train, demo, merge, quantize) is checked: an
output that is, or contains, an input or the working folder is refused; only
the entries recorded in qlora's manifest are removed; inputs are checked before
the model loads; a full disk, a read-only folder and a corrupt model each give
one message and leave what was already written intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.output_folder import MANIFEST, owned_entries

QA = [(f"What is {a} plus {b}?", f"{a + b}.") for a in range(4) for b in range(3)]


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    return path


def _train(model, data, out, *extra) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--seq-len", "48",
                 "--max-steps", "2", "--no-progress", *extra])


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_model_the_data_and_the_working_folder(tmp_path, model_copy, capsys, monkeypatch):
    data = _data(tmp_path / "d.jsonl")
    before = _snapshot(model_copy)
    link = tmp_path / "link-to-model"
    link.symlink_to(model_copy)
    for out in (model_copy, link, tmp_path):  # is the model (also through a symlink); contains model and data
        assert _train(model_copy, data, out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert "--output" in err and ("is the input of --model" in err or "contains" in err) and "Traceback" not in err
    assert _snapshot(model_copy) == before and data.exists()

    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep")
    monkeypatch.chdir(work)
    assert _train(model_copy, data, ".", "--overwrite") == 2
    assert "current working folder" in capsys.readouterr().err
    assert (work / "mine.txt").read_text() == "keep"


def test_overwrite_removes_only_qlora_files(tmp_path, tiny_model_dir, capsys):
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert _train(tiny_model_dir, data, out) == 0
    ours = set(owned_entries(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoints", "config.yaml",
            "metrics.jsonl"} <= ours
    assert all((out / n).exists() for n in ("adapter_model.safetensors", "tokenizer.json"))
    assert "tokenizer.json" in ours  # the tokenizer files qlora wrote are known by name
    (out / "my-notes.md").write_text("results so far")
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("print(1)")
    assert _train(tiny_model_dir, data, out) == 2  # no --overwrite: refused
    assert "--overwrite" in capsys.readouterr().err
    assert _train(tiny_model_dir, data, out, "--overwrite", "--seed", "3") == 0
    assert (out / "my-notes.md").read_text() == "results so far"
    assert (out / "analysis" / "plot.py").read_text() == "print(1)"
    assert (out / "adapter_model.safetensors").is_file()
    assert "my-notes.md" not in owned_entries(out)

    # A non-empty folder qlora never wrote is not cleared, even with --overwrite.
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert _train(tiny_model_dir, data, foreign, "--overwrite") == 2
    assert "not written by qlora" in capsys.readouterr().err
    assert (foreign / "cat.jpg").read_bytes() == b"\xff\xd8" and sorted(os.listdir(foreign)) == ["cat.jpg"]


def test_merge_and_quantize_outputs_are_guarded_and_replace_only_their_files(tmp_path, tiny_model_dir, capsys):
    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run") == 0
    model = shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    before = _snapshot(model)
    merge = ["merge", "--model", str(model), "--adapter", str(tmp_path / "run"), "--dtype", "float32"]
    assert main([*merge, "--output", str(model), "--overwrite"]) == 2
    assert main([*merge, "--output", str(tmp_path / "run"), "--overwrite"]) == 2  # is the adapter
    assert main(["quantize", "--model", str(model), "--output", str(model), "--overwrite"]) == 2
    assert _snapshot(model) == before
    capsys.readouterr()

    out = tmp_path / "merged"
    assert main([*merge, "--output", str(out)]) == 0
    assert "model.safetensors" in owned_entries(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # normal permissions, not 0700
    # and files as `open` makes them: safetensors alone writes 0600, unreadable to a serving account
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~_umask()}
    (out / "README.md").write_text("my model card")
    assert main([*merge, "--output", str(out)]) == 2
    assert main([*merge, "--output", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() == "my model card"
    assert main(["quantize", "--model", str(model), "--output", str(out), "--overwrite"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" in cfg and (out / "README.md").is_file()


def test_demo_needs_overwrite_for_a_non_empty_output(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    assert main(["demo", "--output", str(out), "--steps", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--output", str(out), "--steps", "1", "--overwrite"]) == 2  # not qlora's folder
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_inputs_are_checked_before_the_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import qlora.model.load as load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(load, "load_model", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    assert _train(tiny_model_dir, bad, tmp_path / "o1") == 2
    assert "bad.jsonl line 2" in capsys.readouterr().err
    assert _train(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "o2") == 2
    assert "missing.jsonl" in capsys.readouterr().err
    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "o3", "--eval-data", str(tmp_path / "nope.jsonl")) == 2
    assert "nope.jsonl" in capsys.readouterr().err

    import qlora.output_folder as of

    def read_only(folder):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(of, "_probe", read_only)
    assert _train(tiny_model_dir, data, tmp_path / "o4") == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "Read-only" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_non_writable_output_is_refused(tmp_path, tiny_model_dir, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert _train(tiny_model_dir, _data(tmp_path / "d.jsonl"), parent / "run") == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_full_disk_at_the_final_save_keeps_everything_and_resume_finishes(tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):
    """A full disk while the adapter and tokenizer are written: one message, exit 1, no half-written
    files beside the adapter, and the last checkpoint lets --resume finish the run."""
    import transformers

    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    real = transformers.PreTrainedTokenizerBase.save_pretrained

    def disk_full(self, folder, *a, **k):
        Path(folder, "tokenizer.json").write_text('{"half": ')
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder, "tokenizer.json")))

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", disk_full)
    assert _train(tiny_model_dir, data, out) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "disk is full" in err and "Traceback" not in err
    assert not (out / "tokenizer.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]  # --save-steps 0: still saved
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", real)
    assert _train(tiny_model_dir, data, out, "--resume") == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_torch_save_on_a_full_disk_is_an_os_error(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """torch.save reports ENOSPC as RuntimeError('[enforce fail at inline_container.cc...]'): translated."""
    import torch

    def enforce_fail(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr("qlora.atomic._nearly_full", lambda path: True)
    assert _train(tiny_model_dir, _data(tmp_path / "d.jsonl"), tmp_path / "run", "--save-steps", "1") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_real_full_filesystem_gives_one_message(tmp_path, tiny_model_dir):
    """On a 200 KiB tmpfs (needs mount rights; skipped elsewhere) the real run fails cleanly."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        data = _data(tmp_path / "d.jsonl")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-m", "qlora", "train", "--model", str(tiny_model_dir), "--data",
                               str(data), "--output", str(mnt / "run"), "--seq-len", "48", "--max-steps", "1",
                               "--no-progress", "--rank", "64"], capture_output=True, text=True, env=env)
        assert proc.returncode == 1, proc.stderr
        assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr
        assert not (mnt / "run" / "tokenizer.json").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_corrupt_model_file_is_named(tmp_path, tiny_model_dir, capsys):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    assert _train(model, _data(tmp_path / "d.jsonl"), tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "model.safetensors is corrupt" in err and "Traceback" not in err
    weights.write_bytes(b"\x00" * 64)
    assert main(["quantize", "--model", str(model), "--output", str(tmp_path / "q")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_manifest_lists_only_qlora_entries(tmp_path, tiny_model_dir):
    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run") == 0
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert set(manifest["entries"]) <= set(os.listdir(tmp_path / "run")) | {"events", "loss.png"}
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-0000002"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files)
        assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~_umask()}, folder


def test_overwrite_keeps_a_users_folder_named_like_an_entry_the_run_did_not_write(tmp_path, tiny_model_dir):
    """Only --init loftq writes loftq-base/: a run without it must not claim (and --overwrite delete) the user's."""
    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run") == 0
    mine = tmp_path / "run" / "loftq-base" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("mine")
    assert _train(tiny_model_dir, data, tmp_path / "run", "--overwrite") == 0
    assert mine.read_text() == "mine"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_chat_save_never_replaces_a_file(tmp_path):
    import argparse

    from qlora.cli.commands.chat import _save

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "precious"}\n')
    reply = _save(None, argparse.Namespace(session=None, db=None), str(data))
    assert "already exists" in reply and data.read_text() == '{"text": "precious"}\n'


def test_overwrite_interrupted_between_moves_leaves_no_loadable_half_and_clears_next_time(tmp_path, tiny_model_dir,
                                                                                           capsys, monkeypatch):
    """Ctrl-C while an --overwrite merge moves its files in: the folder holds no config.json until the
    weights and tokenizer are all there (transformers cannot load it half-written), and every file is
    already recorded as qlora's, so the same command with --overwrite finishes the job."""
    import qlora.output_folder as output_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run") == 0
    merge = ["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"), "--dtype", "float32",
             "--output", str(tmp_path / "merged"), "--overwrite"]
    assert main(merge) == 0
    real = os.replace

    def interrupted(src, dst):
        if Path(dst).name == "tokenizer.json":  # weights moved in, tokenizer not yet
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(output_folder.os, "replace", interrupted)
    assert main(merge) == 130
    monkeypatch.setattr(output_folder.os, "replace", real)
    out = tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    with pytest.raises((OSError, ValueError)):  # no config.json: not taken for a model
        AutoModelForCausalLM.from_pretrained(out)
    assert main(merge) == 0
    assert "Traceback" not in capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert sorted(owned_entries(out)) == sorted(p.name for p in out.iterdir() if p.name != MANIFEST)


def test_a_killed_runs_staging_folder_is_named_not_removed(tmp_path, tiny_model_dir, capsys):
    """SIGKILL leaves the hidden staging folder of a write beside its output (the output itself untouched):
    the next run writing there names it with its size, and leaves it (a run may still be writing in it)."""
    out = tmp_path / "q4"
    leftover = tmp_path / ".q4.stage-k1ll3d" / "out"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    (tmp_path / ".q4x.stage-other").mkdir()  # another output's: not named
    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{leftover.parent} (3.0 MiB)" in err and "remove the folder" in err and "q4x" not in err
    assert (leftover / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".q4.") and p != leftover.parent]


def test_merge_on_a_full_disk_writes_nothing(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import qlora.model.merge as merge_module

    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run") == 0

    def disk_full(model, out_dir, tokenizer=None, **options):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(merge_module, "save_merged", disk_full)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"), "--output", str(out),
                 "--dtype", "float32"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_a_read_only_filesystem_is_refused_before_loading(tmp_path, tiny_model_dir, capsys):
    """A real read-only mount (needs mount rights; skipped elsewhere, the probe test above covers it)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert _train(tiny_model_dir, _data(tmp_path / "d.jsonl"), mnt / "run") == 2
        err = capsys.readouterr().err
        assert "cannot be written" in err and "Read-only file system" in err and "Traceback" not in err
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_an_edited_manifest_cannot_reach_outside_the_folder(tmp_path):
    from qlora.output_folder import clear_owned

    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (out / "ours.txt").write_text("x")
    (out / MANIFEST).write_text(json.dumps({"entries": ["../precious.txt", "..", "/etc", "ours.txt"]}))
    clear_owned(out)
    assert (tmp_path / "precious.txt").read_text() == "keep" and not (out / "ours.txt").exists()


def _library_model(model_dir):
    import torch

    import qlora
    from random_adapters import randomize_lora_b

    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, verbose=False)
    randomize_lora_b(model, seed=0)
    return model, tokenizer


def test_library_saves_into_a_users_folder_keep_its_other_files(tmp_path, tiny_model_dir, monkeypatch):
    """qlora.save_adapter / save_merged / save_quantized into an existing folder write their files there as PEFT's
    and transformers' save_pretrained do: the user's other files stay (they replaced the whole folder), and
    the folder loads as what was saved."""
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qlora

    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    model, tokenizer = _library_model(tiny_model_dir)
    mine = {"notes.txt": b"my notes", "data/train.jsonl": b"{}\n"}
    for kind in ("adapter", "merged", "quantized"):
        for name, content in mine.items():
            (tmp_path / kind / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / kind / name).write_bytes(content)
    qlora.save_adapter(model, tmp_path / "adapter")
    merged = qlora.merge(copy.deepcopy(model), dtype=torch.float32)
    qlora.save_merged(merged, tmp_path / "merged", tokenizer)
    quantized, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.save_quantized(quantized, tmp_path / "quantized", tokenizer)
    for kind in ("adapter", "merged", "quantized"):
        assert {n: (tmp_path / kind / n).read_bytes() for n in mine} == mine, kind
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    again, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits,
                                   merged(ids).logits)

    # through a link to the folder: the link stays one, the folder it names gets the files
    (tmp_path / "current").symlink_to(tmp_path / "adapter", target_is_directory=True)
    qlora.save_adapter(model, tmp_path / "current")
    assert (tmp_path / "current").is_symlink() and (tmp_path / "adapter" / "notes.txt").read_bytes() == b"my notes"

    # into the working folder ("."), which holds the user's files too
    monkeypatch.chdir(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    qlora.save_adapter(model, ".")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "notes.txt").read_bytes() == b"my notes"


def test_a_sharded_save_over_a_one_file_one_in_a_users_folder_loads_the_new_weights(tmp_path, tiny_model_dir):
    """transformers reads model.safetensors before an index: the earlier save's weight files go, the user's stay."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import qlora

    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my model card")
    model, tokenizer = _library_model(tiny_model_dir)
    plain, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.save_merged(plain, out, tokenizer)
    merged = qlora.merge(copy.deepcopy(model), dtype=torch.float32)
    qlora.save_merged(merged, out, tokenizer, max_shard_bytes=40_000)
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, merged(ids).logits)
    qlora.save_merged(plain, out, tokenizer)  # and back: no shard of the sharded save is left
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    assert (out / "README.md").read_text() == "my model card"


def test_a_killed_save_of_a_process_with_this_ones_id_is_cleared_or_put_back(tmp_path):
    """A restarted container gives its process the id the killed one had (1, or another small id, each time): the
    killed save's folders, older than this process, are its, not a save under way here. The content set aside
    between the two renames is put back, the half-written copy removed; a folder of this id made since is kept."""
    from qlora.atomic import atomic_dir, clear_leftovers

    pid = os.getpid()
    old, half = tmp_path / f".out.old-{pid}", tmp_path / f".out.tmp-{pid}-k1ll3d_x"
    for folder, text in ((old, "1"), (half, "2")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
        os.utime(folder, (time.time() - 3600, time.time() - 3600))  # before this process started
    fresh = tmp_path / f".other.tmp-{pid}-l1v3_abc"
    fresh.mkdir()
    clear_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", fresh.name])
    assert (tmp_path / "out" / "config.json").read_text() == "1"
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", fresh.name])


def test_a_users_folder_named_like_a_leftover_is_kept(tmp_path):
    """Only the exact names atomic_dir writes (.NAME.old-PID, .NAME.tmp-PID- and mkdtemp's eight characters) are
    leftovers: a user's folders that merely begin alike (a backup, a copy) are never removed nor renamed, even when
    their number is a dead process's; the real leftover beside them is put back."""
    from qlora.atomic import clear_leftovers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    own = [f".out.old-{pid}-backup", f".out.old-{pid}.bak", f".out.old-{pid}-abcdefgh", f".out.tmp-{pid}",
           f".out.tmp-{pid}-keep", f".out.tmp-{pid}-abcdefgh-copy", f".out.tmp-{pid}-ABCDEFGH"]
    for name in [*own, f".out.old-{pid}"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    clear_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*own, "out"])
    assert all((tmp_path / name / "config.json").read_text() == name for name in own)
    assert (tmp_path / "out" / "config.json").read_text() == f".out.old-{pid}"  # the set-aside content, put back


_KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import qlora.atomic as atomic
where, replace, rmtree = sys.argv[2], os.replace, atomic.shutil.rmtree
renames = []
def kill_at(point):
    if point == where:
        os.kill(os.getpid(), signal.SIGKILL)
def renaming(src, dst):
    renames.append(dst)
    kill_at("between renames" if len(renames) == 2 else None)
    replace(src, dst)
def removing(path, **kw):
    kill_at("removing the old" if ".old-" in str(path) else None)
    rmtree(path, **kw)
atomic.os.replace, atomic.shutil.rmtree = renaming, removing
with atomic.atomic_dir(sys.argv[1]) as tmp:
    (tmp / "config.json").write_text("2")
    kill_at("writing")
"""


@pytest.mark.parametrize("where", ["writing", "between renames", "removing the old"])
def test_a_killed_atomic_save_leaves_hidden_folders_the_next_save_clears_or_puts_back(tmp_path, where):
    """kill -9 in an atomic save over a folder leaves its copy being written (.out.tmp-PID-...) or the previous
    content set aside (.out.old-PID), as large as the folder; the next save clears them, and where the kill fell
    between the two renames (no out at all), puts the previous content back. A running writer's are kept."""
    from qlora.atomic import atomic_dir, clear_leftovers

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("1")
    killed = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out), where],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert killed.returncode == -9
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden and all(n.startswith((".out.tmp-", ".out.old-")) for n in hidden), hidden
    assert out.exists() == (where != "between renames")
    running = tmp_path / f".out.old-{os.getppid()}"  # a save under way in a live process: never touched
    running.mkdir()
    clear_leftovers(tmp_path, "other")  # another target's: nothing changes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([*hidden, running.name])
    if where == "between renames":  # the previous content, put back whole
        clear_leftovers(tmp_path)
        assert (out / "config.json").read_text() == "1"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("3")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name])
    assert (out / "config.json").read_text() == "3"


def test_a_checkpoint_set_aside_by_a_killed_save_is_found_at_once(tmp_path):
    """A checkpoint replaced by a save killed between its two renames is only ``.step-N.old-PID``: a resume, and the
    hint naming a stopped run's newest checkpoint, put it back and find it then, not after the next save."""
    from qlora.model.local_path import adapter_folder_problem
    from qlora.train.trainer import STATE_FILE, list_checkpoints

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-000000{step}" / "adapter").mkdir(parents=True)
        (run / "checkpoints" / f"step-000000{step}" / "adapter" / "adapter_config.json").write_text("{}")
        (run / "checkpoints" / f"step-000000{step}" / STATE_FILE).write_text(str(step))
    newest = run / "checkpoints" / "step-0000004"

    def killed_save() -> None:
        # the save writes what a checkpoint holds, so that it replaces the folder whole (two renames)
        script = _KILLED_SAVE.replace('(tmp / "config.json").write_text("2")',
                                      f'(tmp / "{STATE_FILE}").write_text("5"); (tmp / "adapter").mkdir()')
        killed = subprocess.run([sys.executable, "-c", script, str(newest), "between renames"],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
        assert killed.returncode == -9 and not newest.exists()

    killed_save()
    assert f"{newest / 'adapter'}." in adapter_folder_problem(run)
    killed_save()
    assert list_checkpoints(run)[-1] == newest and (newest / STATE_FILE).read_text() == "4"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]



def test_a_reader_of_a_run_in_progress_leaves_its_save_under_way(tmp_path):
    """``qlora generate --adapter RUN`` (or eval, chat, serve) on a run without its final adapter reads the run's
    checkpoints for its hint. Its process ids are not the writer's where it runs in another container or on another
    machine (an eval job beside a training job on a shared volume): the writer's save under way looks like a killed
    process's there. The reader put back a set-aside checkpoint and deleted that save's folder, failing the save."""
    from qlora.model.local_path import adapter_folder_problem

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # an id no process here has: a writer seen from elsewhere
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000002" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-0000002" / "adapter" / "adapter_config.json").write_text("{}")
    writing = run / "checkpoints" / f".step-0000004.tmp-{pid}-x1"
    (writing / "adapter").mkdir(parents=True)
    set_aside = run / "checkpoints" / f".step-0000003.old-{pid}"
    (set_aside / "adapter").mkdir(parents=True)
    (set_aside / "adapter" / "adapter_config.json").write_text("{}")
    assert f"{run / 'checkpoints' / 'step-0000003' / 'adapter'}." in adapter_folder_problem(run)
    assert (writing / "adapter").is_dir()  # the save goes on
