"""The command line end to end: train, eval, merge, quantize, and a run stopped by a signal."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.train.trainer import list_checkpoints
from qlora.cli.commands.serve import chat_formats
from qlora.cli.main import main
from qlora.model.chat_format import ChatFormat
from qlora.output_folder import MANIFEST

QA = [(f"What is {a} plus {b}?", f"{a + b}.") for a in range(6) for b in range(5)]
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])


def _data(path):
    path.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    return path


def _train(model_dir, data, out, *extra):
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--seq-len", "64",
            "--batch-size", "2", "--lr", "1e-2", "--no-progress", *extra]
    return main(argv)


def test_train_eval_merge_quantize(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    data = _data(tmp_path / "d.jsonl")
    assert _train(tiny_model_dir, data, tmp_path / "run", "--max-steps", "30", "--quant", "nf4") == 0
    capsys.readouterr()

    def eval_loss(*extra):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), *extra]) == 0
        return float(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))

    assert eval_loss("--adapter", str(tmp_path / "run")) < 0.9 * eval_loss()

    with warnings.catch_warnings():  # huggingface_hub's own bars stay off (conftest's env var) and it says so
        warnings.simplefilter("ignore")
        hf_logging.enable_progress_bar()  # transformers' bars as a user has them
        try:
            assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"),
                         "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
        finally:
            hf_logging.disable_progress_bar()
    assert "Writing model shards" not in capsys.readouterr().err  # transformers' bar: only over 1 GB, as loading's
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "run")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)

    # The merged model is prompted in the adapter's chat format, as the adapter is (not as raw text).
    def generate(*model_args):
        assert main(["generate", *model_args, "--compute-dtype", "fp32", "--temperature", "0", "--max-new-tokens",
                     "12", "--prompt", QA[4][0]]) == 0
        return capsys.readouterr().out

    with_adapter = generate("--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"))
    assert generate("--model", str(tmp_path / "merged"), "--quant", "none") == with_adapter
    assert generate("--model", str(tmp_path / "merged"), "--quant", "none", "--template", "none") != with_adapter
    trained = ChatFormat.load(tmp_path / "run")
    assert trained is not None and chat_formats(argparse.Namespace(model=str(tmp_path / "merged"), adapter=[],
                                                                   template="auto"), None) == {None: trained}
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "merged-q4")]) == 0
    assert ChatFormat.load(tmp_path / "merged-q4") == trained

    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(tmp_path / "q4")]) == 0
    reloaded, _ = qlora.load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    direct, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    four_bit = {k: v for k, v in direct.state_dict().items() if ".weight." in k or k.endswith("proj.weight")}
    got = reloaded.state_dict()
    assert four_bit and all(torch.equal(got[k], v) for k, v in four_bit.items())  # same codes and constants
    # Unquantized tensors were stored in bf16 (the command's compute dtype): bf16 tolerance.
    torch.testing.assert_close(reloaded(IDS).logits, direct(IDS).logits, rtol=2e-2, atol=2e-2)
    # An existing output is refused, not overwritten.
    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(tmp_path / "q4")]) == 2


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_model_dir, capfd):
    data = _data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    src = os.path.dirname(os.path.dirname(qlora.__file__))
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "qlora", "train", "--model", str(tiny_model_dir), "--data", str(data),
           "--output", str(out), "--seq-len", "64", "--batch-size", "2", "--no-progress", "--max-steps", "100000",
           "--save-steps", "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count('"step"') >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = int(re.search(r"(\d+)$", checkpoints[0].name).group(1))
    assert stopped_at >= 3
    assert (checkpoints[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MANIFEST]  # no half-written temporary folder
    # The stopped run as --adapter: the message says how to finish it or which checkpoint to give.
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "x"]) == 2
    message = capfd.readouterr().err
    assert "--resume" in message and str(checkpoints[0] / "adapter") in message and "Traceback" not in message
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(checkpoints[0]), "--prompt", "x"]) == 2
    assert f"give {checkpoints[0] / 'adapter'}" in capfd.readouterr().err


def test_an_adapter_folder_without_its_adapter_names_the_newest_checkpoint(tmp_path):
    from qlora.model.adapter_io import read_adapter_config

    # by step number (not name length or letters), and a user's copy beside them (step-0000100.bak) is none
    for step in ("step-0000009", "step-0000012", "step-0000100", "step-0000100.bak", "step-99"):
        (tmp_path / "run" / "checkpoints" / step / "adapter").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / step / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"without its final adapter.*--resume.*step-0000100/adapter\.$"):
        read_adapter_config(tmp_path / "run")
    with pytest.raises(UsageError, match=r"holds its adapter in the subfolder adapter: give .*step-0000012/adapter"):
        read_adapter_config(tmp_path / "run" / "checkpoints" / "step-0000012")


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, tiny_model_dir):
    data = _data(tmp_path / "d.jsonl")
    src = os.path.dirname(os.path.dirname(qlora.__file__))
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cmd(out, *extra):
        return [sys.executable, "-m", "qlora", "train", "--model", str(tiny_model_dir), "--data", str(data),
                "--output", str(out), "--seq-len", "64", "--batch-size", "2", "--no-progress", "--max-steps", "40",
                "--save-steps", "2", "--optim", "paged_adamw_8bit", "--dropout", "0.1", *extra]

    full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(killed):  # a complete checkpoint, however slow the CPU
        time.sleep(0.02)
    proc.kill()  # SIGKILL at once (no handler runs): on an idle CPU the remaining 38 steps take under half a second
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # it died mid-run
    resumed = subprocess.run(cmd(killed, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(killed) == _losses(tmp_path / "full")
    assert len(_losses(killed)) == 40
