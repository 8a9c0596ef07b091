"""What a user without the optional packages gets: every command works, says what is missing in one line,
and never imports what it does not need.

Each command runs in a subprocess whose ``sitecustomize`` hides chosen packages from the import system (as if
they were not installed: ``importlib.util.find_spec`` answers None, ``import`` raises ModuleNotFoundError) and
records, at exit, which modules the command imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Everything qlora may use but does not need on a CPU: never imported unless a feature asks for it.
OPTIONAL = ("tensorboard", "triton", "faiss", "sentence_transformers", "pexpect", "bitsandbytes", "peft", "trl")

SITECUSTOMIZE = '''
import atexit, json, os, sys
from importlib.machinery import PathFinder

HIDDEN = set(filter(None, os.environ.get("QLORA_TEST_HIDE", "").split(",")))


class _Hide:
    """PathFinder, blind to the hidden top-level packages."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(PathFinder, attr)


sys.meta_path[:] = [_Hide() if f is PathFinder else f for f in sys.meta_path]


@atexit.register
def _record():
    with open(os.environ["QLORA_TEST_MODULES"], "w") as f:
        json.dump(sorted(sys.modules), f)
'''


def _qlora(tmp_path: Path, args: list[str], hide: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, set]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    modules = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{SRC}", "QLORA_TEST_HIDE": ",".join(hide),
           "QLORA_TEST_MODULES": str(modules), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-m", "qlora", *args], env=env, capture_output=True, text=True,
                          timeout=600, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, set(json.loads(modules.read_text()))


def _top(modules: set) -> set:
    return {m.partition(".")[0] for m in modules}


def _own_kernels(modules: set) -> set:
    """qlora's Triton modules (torch's compiler, which transformers imports, may look for Triton itself)."""
    return {m for m in modules if m.startswith(("qlora.quant.kernels.triton", "qlora.nn.fused"))}


def _train_args(model_dir: Path, data: Path, out: Path) -> list[str]:
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 1?", "output": f"{a + 1}."}) + "\n"
                            for a in range(8)))
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--seq-len", "32", "--no-progress"]


@pytest.mark.slow
def test_train_without_optional_packages_keeps_the_run_and_says_what_to_install(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc, modules = _qlora(tmp_path, _train_args(tiny_model_dir, tmp_path / "d.jsonl", out),
                           hide=OPTIONAL + ("matplotlib",))
    assert proc.returncode == 0, proc.stderr
    said = (proc.stdout + proc.stderr).splitlines()
    assert sum("pip install tensorboard" in line for line in said) == 1, said
    assert sum("pip install matplotlib" in line for line in said) == 1, said
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "loss.png").exists() and not (out / "events").exists()
    assert not _top(modules) & {"tensorboard", "matplotlib", *OPTIONAL}


@pytest.mark.slow
def test_commands_import_only_what_they_need(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc, modules = _qlora(tmp_path, _train_args(tiny_model_dir, tmp_path / "d.jsonl", out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "loss.png").is_file()  # the dependency draws it
    unneeded = {"faiss", "sentence_transformers", "pexpect", "bitsandbytes", "peft", "trl", "datasets", "pyarrow"}
    assert not _top(modules) & unneeded, _top(modules) & unneeded  # a .jsonl file needs no `datasets`
    assert not _own_kernels(modules), _own_kernels(modules)  # nor a CPU run qlora's Triton kernels

    proc, modules = _qlora(tmp_path, ["generate", "--model", str(tiny_model_dir), "--adapter", str(out),
                                      "--prompt", "What is 2 plus 1?", "--max-new-tokens", "4"], hide=OPTIONAL)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert not _top(modules) & (unneeded | {"matplotlib", "tensorboard"}) and not _own_kernels(modules)

    proc, modules = _qlora(tmp_path, ["estimate", "--model", "llama-3-8b"])
    assert proc.returncode == 0 and "QLoRA" in proc.stdout, proc.stderr
    assert not _top(modules) & (unneeded | {"matplotlib", "tensorboard"}) and not _own_kernels(modules)


def test_k_quant_export_without_llama_cpp_says_what_to_install_before_loading(tmp_path, tiny_model_dir):
    out = tmp_path / "gguf"
    proc, modules = _qlora(tmp_path, ["export", "--model", str(tiny_model_dir), "--output", str(out),
                                      "--type", "q4_k_m"], hide=("llama_cpp",))
    assert proc.returncode == 2, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and "pip install llama-cpp-python" in said[0] and "llama-quantize" in said[0], said
    assert not out.exists()
    assert "transformers" not in _top(modules)  # refused before the model is loaded


def test_a_model_whose_tower_needs_a_missing_package_is_refused_with_the_package(tmp_path, tiny_model_dir):
    """Gemma 3n's vision tower is a timm model: without timm, one paragraph naming it, not a traceback."""
    import shutil

    from transformers import Gemma3nConfig

    model = tmp_path / "gemma3n"
    shutil.copytree(tiny_model_dir, model)
    Gemma3nConfig().save_pretrained(model)
    proc, _ = _qlora(tmp_path, ["generate", "--model", str(model), "--prompt", "hi"], hide=("timm",))
    said = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(said) == 1, proc.stderr
    assert "gemma3n" in said[0] and "pip install timm" in said[0], said
