"""``--help`` and bad options are instant: building a command's parser, printing its help and refusing an
option import neither torch nor transformers (seconds of imports before a one-line message).

Each case runs in a fresh interpreter (``sys.modules`` of this test process already holds torch), which calls
``qlora.cli.main.main`` and reports its exit status, its stderr and which of the heavy modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.cli.main import COMMANDS

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers")

PROBE = f'''
import contextlib, io, json, sys
from qlora.cli.main import main

out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
heavy = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}}))
'''

# A bad option of every command, refused by its parser or by the checks that run before anything loads
# (with the words its one-line message must hold).
OPTION_ERRORS = {
    "estimate": [(["--rank", "0"], "--rank"), ([], "give the model")],
    "train": [(["--model", "m", "--data", "d.jsonl", "--output", "o", "--rank", "0"], "--rank"),
              (["--model", "m", "--data", "d.jsonl", "--output", "o", "--optim", "adamw_hf"], "--optim"),
              (["--model", "m", "--data", "d.jsonl", "--output", "o", "--lr-scheduler", "bogus"], "--lr-scheduler"),
              (["--model", "m", "--data", "d.jsonl", "--output", "o", "--init", "pissa", "--dora"], "--dora"),
              (["--learning-rate", "1e-4"], "did you mean --lr"), (["--rnak", "8"], "--rank"),
              (["missing.yaml"], "missing.yaml")],
    "eval": [(["--model", "m"], "--data"),
             (["--model", "m", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size")],
    "merge": [(["--model", "m"], "--output")],
    "quantize": [(["--model", "m", "--output", "o", "--blocksize", "3"], "--blocksize")],
    "export": [(["--model", "m"], "--output")],
    "demo": [(["--steps", "0"], "--steps")],
    "quant-error": [(["--numel", "1"], "--numel")],
    "generate": [(["--model", "m", "--prompt", "hi", "--top-p", "2"], "--top-p"),
                 (["--model", "m", "--prompt", "hi", "--template", "missing.jinja"], "missing.jinja"),
                 (["--model", "m", "--prompt", "hi", "--chat-template-kwargs", "{bad"], "--chat-template-kwargs")],
    "chat": [(["--model", "m", "--temperature", "-1"], "--temperature"),
             (["--model", "m", "--chat-template-kwargs", "[1]"], "--chat-template-kwargs")],
    "serve": [(["--model", "m", "--port", "70000"], "--port"),
              (["--model", "m", "--default-chat-template-kwargs", '{"tokenize": true}'],
               "--default-chat-template-kwargs")],
}
CASES = [(command, ["--help"], 0, f"usage: qlora {command}") for command in COMMANDS] + [
    (command, argv, 2, words) for command, errors in OPTION_ERRORS.items() for argv, words in errors]


def _probe(argv: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_version_is_printed_without_the_heavy_imports(tmp_path):
    import qlora

    result = _probe(["--version"], tmp_path)
    assert result["code"] == 0 and result["out"].strip() == f"qlora {qlora.__version__}" and not result["heavy"]


def test_every_command_has_an_option_error_case():
    assert set(OPTION_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize(("command", "argv", "code", "words"), CASES,
                         ids=[" ".join([c, *a]) for c, a, _, _ in CASES])
def test_help_and_option_errors_import_no_torch(command, argv, code, words, tmp_path):
    out = _probe([command, *argv], tmp_path)
    if code == 0:
        assert out["code"] == 0 and words in out["out"] and "options:" in out["out"], out["err"]
    else:
        assert out["code"] == code and "error:" in out["err"] and words in out["err"], out["err"]
        assert "Traceback" not in out["err"]
    assert out["heavy"] == [], f"qlora {command} {' '.join(argv)} imported {out['heavy']}"


# A model path that can only be local (./, /, ~, a second /) and is not there, for every command that loads one.
MISSING_MODEL = {
    "train": ["--model", "./typo", "--data", "d.jsonl", "--output", "o"],
    "eval": ["--model", "~/qlora-no-such-model", "--data", "d.jsonl"],
    "merge": ["--model", "./typo", "--output", "o"],
    "quantize": ["--model", "./typo", "--output", "o"],
    "export": ["--model", "./typo", "--output", "o"],
    "generate": ["--model", "./typo", "--prompt", "hi"],
    "chat": ["--model", "models/llama/typo"],
    "serve": ["--model", "/qlora-no-such-model"],
    "estimate": ["./typo"],
}


@pytest.mark.parametrize("command", sorted(MISSING_MODEL))
def test_a_missing_model_path_is_refused_before_the_imports(command, tmp_path):
    argv = MISSING_MODEL[command]
    given = next(a for a in argv if a.startswith((".", "/", "~", "models/")))
    out = _probe([command, *argv], tmp_path)
    assert out["code"] == 2 and f"{given}: " in out["err"] and " does not exist" in out["err"], out["err"]
    assert "Traceback" not in out["err"]
    assert out["heavy"] == [], f"qlora {command} {' '.join(argv)} imported {out['heavy']}"


def test_a_missing_path_names_a_close_one_and_a_hub_id_goes_to_the_loader(tmp_path):
    (tmp_path / "tiny-model").mkdir()
    out = _probe(["generate", "--model", "./tiny-modle", "--prompt", "hi"], tmp_path)
    assert out["code"] == 2 and f"did you mean {tmp_path / 'tiny-model'}?" in out["err"], out["err"]
    # org/name may be a hub id: not refused as a path, the loader looks for it (offline: in the cache) and its
    # refusal names the option, as the startup checks do
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    for command, rest in (("generate", ["--prompt", "hi"]), ("train", ["--data", "d.jsonl", "--output", "o"]),
                          ("eval", ["--data", "d.jsonl"]), ("quantize", ["--output", "q"])):
        out = _probe([command, "--model", "org/no-such-model", *rest], tmp_path)
        assert out["code"] == 2 and "does not exist" not in out["err"], out["err"]
        assert ("--model org/no-such-model is not a local path and not in the Hugging Face cache" in out["err"]
                and "Traceback" not in out["err"]), out["err"]


def test_a_missing_model_named_in_the_yaml_file_is_refused_before_the_imports(tmp_path):
    (tmp_path / "x.yaml").write_text("data: d.jsonl\nmodel: ./missing\noutput: o\n")
    out = _probe(["train", "x.yaml"], tmp_path)
    assert out["code"] == 2 and "x.yaml line 2 (model): --model ./missing: " in out["err"], out["err"]
    assert f"{tmp_path / 'missing'} does not exist" in out["err"] and "Traceback" not in out["err"], out["err"]
    assert out["heavy"] == [], out["heavy"]
    (tmp_path / "x.yaml").write_text("model: ./missing\nadapter: ./no-adapter\ndata: d.jsonl\noutput: o\n")
    out = _probe(["train", "x.yaml"], tmp_path)
    assert out["code"] == 2 and "x.yaml line 2 (adapter): --adapter ./no-adapter: " in out["err"], out["err"]
    assert out["heavy"] == [], out["heavy"]


# Every command that loads a model from --model (the rest of each command line).
LOADS_A_MODEL = {
    "train": ["--data", "d.jsonl", "--output", "o"], "eval": ["--data", "d.jsonl"], "merge": ["--output", "o"],
    "quantize": ["--output", "o"], "export": ["--output", "o"], "generate": ["--prompt", "hi"], "chat": [],
    "serve": [], "estimate": [],
}


@pytest.mark.parametrize("command", sorted(LOADS_A_MODEL))
def test_a_folder_or_file_that_is_no_model_is_refused_before_the_imports(command, tmp_path):
    """A folder without config.json (or adapter_config.json) and a lone weights file are not what the loaders read
    (resolve_model_dir, estimate's load_config): said at once, with the model folder inside when there is one."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "hub" / "snapshot").mkdir(parents=True)
    (tmp_path / "hub" / "snapshot" / "config.json").write_text("{}")
    (tmp_path / "hub" / "snapshot" / "model.safetensors").write_bytes(b"")
    for model, words in (("./empty", "has no config.json, so it is not a transformers model folder"),
                         ("./hub", f"Its subfolder {tmp_path / 'hub' / 'snapshot'} holds a config.json"),
                         ("./hub/snapshot/model.safetensors", "is a file")):
        if command == "estimate" and model.endswith(".safetensors"):
            continue  # estimate reads a config.json file given alone; its own check names a file that is not one
        out = _probe([command, "--model", model, *LOADS_A_MODEL[command]], tmp_path)
        assert out["code"] == 2 and f"--model {model}: " in out["err"] and words in out["err"], out["err"]
        assert "Traceback" not in out["err"]
        assert out["heavy"] == [], f"qlora {command} --model {model} imported {out['heavy']}"


# Every command that takes --adapter: the rest of its command line around a model folder that is there.
TAKES_AN_ADAPTER = {
    "train": ["--data", "d.jsonl", "--output", "o"], "eval": ["--data", "d.jsonl"], "merge": ["--output", "o"],
    "export": ["--output", "o"], "generate": ["--prompt", "hi"], "chat": [], "serve": [],
}


@pytest.mark.parametrize("command", sorted(TAKES_AN_ADAPTER))
def test_a_missing_adapter_is_refused_before_the_imports(command, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "my-adapter").mkdir()
    named = command in ("generate", "chat", "serve")  # these take repeated --adapter [NAME=]DIR
    for adapter, words in ((("sql=" if named else "") + "./my-adaptr", f"did you mean {tmp_path / 'my-adapter'}?"),
                           ("./my-adapter", "./my-adapter is not an adapter folder: adapter_config.json is missing"),
                           ("./model/config.json", "is a file; give the adapter's folder")):
        argv = [command, "--model", "./model", "--adapter", adapter, *TAKES_AN_ADAPTER[command]]
        out = _probe(argv, tmp_path)
        assert out["code"] == 2 and f"--adapter {adapter}: " in out["err"] and words in out["err"], out["err"]
        assert "Traceback" not in out["err"]
        assert out["heavy"] == [], f"qlora {' '.join(argv)} imported {out['heavy']}"


@pytest.mark.parametrize("command", sorted(TAKES_AN_ADAPTER))
def test_an_adapter_named_like_a_hub_id_is_refused_naming_the_option_before_the_model_loads(command, tmp_path):
    """After the command's other options (a hub id may be a typo of theirs), before the model's load: the folder
    holds a config.json and no weights, so a load would have been refused for those instead."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"text": "hi"}\n')
    adapter = ("sql=" if command in ("generate", "chat", "serve") else "") + "org/x"
    out = _probe([command, "--model", "./model", "--adapter", adapter, *TAKES_AN_ADAPTER[command]], tmp_path)
    assert out["code"] == 2 and f"--adapter {adapter}: " in out["err"], out["err"]
    assert "if org/x is a hub id, download it first (hf download org/x --local-dir DIR)" in out["err"], out["err"]
    assert "Traceback" not in out["err"] and not (tmp_path / "o").exists()


def test_an_adapter_named_like_a_hub_id_is_said_to_be_read_from_local_folders_only(tmp_path, monkeypatch):
    """qlora downloads models, not adapters: a name that is no folder here is named with how to download it."""
    from qlora.model.local_path import adapter_folder_problem

    monkeypatch.chdir(tmp_path)
    problem = adapter_folder_problem("org/adapter")
    assert f"{tmp_path / 'org' / 'adapter'} does not exist" in problem, problem
    assert "hf download org/adapter --local-dir DIR" in problem, problem
    assert "hf download" not in adapter_folder_problem("./org/adapter")
