"""--resume compares what a run uses, not how it was spelled: another spelling of the same options resumes to the
uninterrupted run's losses, while a real change is refused by name, also one made under the same path (other rows in
the data file, other weights in the model folder), which names the file and how to go on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.train.config import load_config
from qlora.train.trainer import Trainer, list_checkpoints

from cli_exit import cli_exit

SFT = [{"instruction": "word " * (1 + 2 * i) + "?", "output": ("x y " * (1 + (5 * i) % 7)).strip()} for i in range(7)]
PAIRS = [{"prompt": f"Question {i}: " + "word " * i, "chosen": " good" * (1 + i % 3), "rejected": " bad" * (1 + i % 4)}
         for i in range(6)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(opts: dict) -> list[float]:
    return Trainer(load_config(None, opts)).run()


def _cut_after_first_checkpoint(full: Path, part: Path) -> None:
    """``part`` as if the run in ``full`` had been killed right after its first checkpoint."""
    shutil.copytree(full, part)
    for later in list_checkpoints(part)[1:]:
        shutil.rmtree(later)
    (part / "adapter_model.safetensors").unlink()


def _copy_model(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


SPELLINGS = {
    "sft": (SFT, dict(max_steps=4, target_modules="q_proj, v_proj", rank_pattern="v_proj=4,", precision="auto",
                      epochs=1.0, warmup_steps=1, warmup_ratio=0.03, lr_scheduler="linear",
                      template="../model/chat_template.jinja"),
            dict(target_modules="v_proj,q_proj", rank_pattern="v_proj=4", precision="fp32", epochs=3.0,
                 warmup_ratio=0.5)),
    "dpo": (PAIRS, dict(method="dpo", max_steps=4, loss_type=""), dict(loss_type="sigmoid")),
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_another_spelling_of_the_same_run_resumes_to_its_losses(tmp_path, tiny_model_dir, monkeypatch, name):
    """Paths spelled relative, with ./ or ../ and absolute, target lists in another order or with spaces, a
    pattern's trailing comma, a template file's path, precision auto and what it resolves to, DPO's default loss type named, --epochs
    while --max-steps sets the length and --warmup-ratio while --warmup-steps sets the warmup: the same run."""
    rows, first, second = SPELLINGS[name]
    work = tmp_path / "work"
    work.mkdir()
    _write(work / "d.jsonl", rows)
    _copy_model(tiny_model_dir, tmp_path / "model")
    monkeypatch.chdir(work)
    base = dict(optim="adamw", lr=1e-2, batch_size=2, progress=False, seq_len=64, save_total_limit=0, save_steps=2,
                dropout=0.1)
    full, part = tmp_path / "full", tmp_path / "part"
    losses = _run(base | first | dict(model="../model", data="./d.jsonl", output=str(full)))
    assert len(losses) == 4 and len(list_checkpoints(full)) == 2
    _cut_after_first_checkpoint(full, part)
    resumed = base | first | second | dict(model=str(tmp_path / "model"), data="d.jsonl", output=str(part),
                                           resume=True)
    if "template" in first:
        resumed["template"] = str(tmp_path / "model" / "chat_template.jinja")
    assert _run(resumed) == losses


def _checkpointed_run(tmp_path: Path, tiny_model_dir: Path) -> tuple[list[str], Path, Path, Path]:
    """A finished 2-step run with a checkpoint a step: its command line, data file, model folder and output."""
    data = _write(tmp_path / "d.jsonl", SFT)
    model = _copy_model(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "o"
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "2", "--save-steps", "1", "--no-progress", "--target-modules", "q_proj,v_proj"]
    assert main(argv) == 0
    return argv, data, model, out


def test_real_changes_are_still_refused_by_name(tmp_path, tiny_model_dir, capsys):
    argv, _, _, out = _checkpointed_run(tmp_path, tiny_model_dir)
    for flags, named in ((["--target-modules", "q_proj,k_proj"], "target_modules"),
                         (["--precision", "bf16"], "precision: 'fp32' -> 'bf16'")):
        code, err = cli_exit(argv + ["--resume"] + flags, capsys)
        assert code == 2 and "different config" in err and named in err and "Traceback" not in err, err
    code, err = cli_exit(argv + ["--resume", "--max-steps", "1"], capsys)  # ends before the checkpoint
    assert code == 2 and "max_steps: 2 -> 1" in err and "Traceback" not in err, err
    code, err = cli_exit(argv + ["--resume", "--warmup-steps", "1", "--epochs", "2"], capsys)
    assert code == 2 and "warmup_steps: 0 -> 1" in err and "epochs" not in err, err  # --max-steps sets the length


def test_a_data_file_changed_under_the_same_path_is_refused_naming_it(tmp_path, tiny_model_dir, capsys):
    argv, data, _, out = _checkpointed_run(tmp_path, tiny_model_dir)
    _write(data, SFT[::-1])  # the same rows in another order: the same size, another run
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and str(data) in err and "--data" in err and "Traceback" not in err, err
    assert f"qlora train --adapter {out}" in err, err
    _write(data, SFT)
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 0, err


def test_model_weights_changed_under_the_same_path_are_refused_naming_them(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file, save_file

    argv, _, model, out = _checkpointed_run(tmp_path, tiny_model_dir)
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: -v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})  # the same size
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and str(weights) in err and "--model" in err and "Traceback" not in err, err
    save_file(tensors, str(weights), metadata={"format": "pt"})
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 0, err


def test_a_relative_data_path_resumed_from_another_folder_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The same ``--data d.jsonl`` in another working folder is another file."""
    here, there = tmp_path / "here", tmp_path / "there"
    for folder, rows in ((here, SFT), (there, SFT[1:])):
        folder.mkdir()
        _write(folder / "d.jsonl", rows)
    argv = ["train", "--model", str(tiny_model_dir), "--data", "d.jsonl", "--output", str(tmp_path / "o"),
            "--optim", "adamw", "--max-steps", "2", "--save-steps", "1", "--no-progress"]
    monkeypatch.chdir(here)
    assert main(argv) == 0
    monkeypatch.chdir(there)
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and str(here / "d.jsonl") in err and str(there / "d.jsonl") in err, err


def test_a_checkpoint_from_before_fingerprints_resumes(tmp_path, tiny_model_dir, capsys):
    """A checkpoint that records no fingerprint (and relative paths, as qlora wrote them then) is not compared."""
    argv, data, _, out = _checkpointed_run(tmp_path, tiny_model_dir)
    for ckpt in list_checkpoints(out):
        saved = json.loads((ckpt / "run_config.json").read_text())
        assert "source_files" in saved
        del saved["source_files"]
        (ckpt / "run_config.json").write_text(json.dumps(saved))
    _write(data, SFT[::-1])
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 0, err


def test_a_large_weight_file_is_told_apart_by_sampled_blocks(tmp_path):
    """Over 64 MiB a model file is fingerprinted from its head and spread blocks: other bytes in its header or over
    a stretch of its weights (as other weights are everywhere) change the fingerprint; the same bytes do not."""
    from qlora.train.file_fingerprint import file_fingerprint, model_fingerprints

    size = 80 << 20

    def weights(name: str, at: int = 0, stretch: bytes = b"") -> Path:
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        with open(path, "wb") as fh:  # sparse: zeros but where written
            fh.truncate(size)
            fh.seek(at)
            fh.write(stretch)
        return path

    same, again = weights("a"), weights("b")
    other_header = weights("c", 100, b"\x01" * 8)
    other_weights = weights("d", 40 << 20, b"\x01" * (8 << 20))
    prints = [file_fingerprint(p, sample_large=True) for p in (same, again, other_header, other_weights)]
    assert prints[0] == prints[1] and "sampled_sha256" in prints[0] and prints[0]["size"] == size
    assert prints[2] != prints[0] and prints[3] != prints[0]
    assert list(model_fingerprints(str(same.parent)).values()) == [prints[0]]
    assert file_fingerprint(same)["sha256"] != file_fingerprint(other_weights)["sha256"]


def test_a_data_folder_with_other_rows_is_refused_naming_its_file(tmp_path, tiny_model_dir, capsys):
    """A save_to_disk folder is fingerprinted file by file: rewritten with other rows, its resume names a file."""
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(SFT).save_to_disk(str(folder))
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(folder), "--output", str(tmp_path / "o"),
            "--optim", "adamw", "--max-steps", "2", "--save-steps", "1", "--no-progress"]
    assert main(argv) == 0
    shutil.rmtree(folder)
    datasets.Dataset.from_list(SFT[::-1]).save_to_disk(str(folder))
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and f"{folder}/" in err and "(--data)" in err and "Traceback" not in err, err


def test_only_the_files_that_make_the_model_are_fingerprinted(tmp_path, tiny_model_dir, capsys):
    """A README, licence or trainer state beside the model may be edited and the run still resumes; a vocabulary or
    a chat template saved beside the default one is fingerprinted, and its change is refused naming it."""
    from qlora.train.file_fingerprint import model_fingerprints

    model = _copy_model(tiny_model_dir, tmp_path / "model")
    docs = {"README.md": "# tiny", "LICENSE.txt": "MIT", "LICENSE": "MIT", "USE_POLICY.md": "be kind",
            "training_args.bin": "args", "requirements.txt": "torch"}
    made = {"vocab.txt": "a\nb\n", "merges.txt": "#version: 0.2\n", "pytorch_model.bin": "weights",
            "additional_chat_templates/tool_use.jinja": "{{ messages }}"}
    for name, text in {**docs, **made}.items():
        (model / name).parent.mkdir(exist_ok=True)
        (model / name).write_text(text)
    printed = {Path(p).relative_to(model.resolve()).as_posix() for p in model_fingerprints(str(model))}
    assert set(made) <= printed and not set(docs) & printed, printed
    assert {"config.json", "model.safetensors"} <= printed, printed

    data = _write(tmp_path / "d.jsonl", SFT)
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"), "--optim", "adamw",
            "--max-steps", "2", "--save-steps", "1", "--no-progress"]
    assert main(argv) == 0
    for name in docs:
        (model / name).write_text("edited " * 9)
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 0, err
    template = model / "additional_chat_templates" / "tool_use.jinja"
    template.write_text("{{ messages | tojson }}")
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and str(template.resolve()) in err and "(--model)" in err and "Traceback" not in err, err


def test_a_hub_model_at_another_cached_revision_is_refused_naming_both(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A hub id is fingerprinted by the commit the cache's refs/main names: the run records it, a resume after the
    cache moved to another commit (other weights) is refused naming both commits, and resumes once it is back."""
    import huggingface_hub.constants
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--org--tiny"
    first, second = "a" * 40, "b" * 40
    for commit in (first, second):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    weights = repo / "snapshots" / second / "model.safetensors"
    save_file({k: -v for k, v in load_file(str(weights)).items()}, str(weights), metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    data, out = _write(tmp_path / "d.jsonl", SFT), tmp_path / "o"
    argv = ["train", "--model", "org/tiny", "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "2", "--save-steps", "1", "--no-progress"]
    assert main(argv) == 0
    saved = json.loads((list_checkpoints(out)[-1] / "run_config.json").read_text())
    assert saved["source_files"]["--model"] == {"org/tiny": {"revision": first}}
    (repo / "refs" / "main").write_text(second)
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 2 and "org/tiny (--model)" in err and first in err and second in err and "Traceback" not in err
    (repo / "refs" / "main").write_text(first)
    code, err = cli_exit(argv + ["--resume"], capsys)
    assert code == 0, err
