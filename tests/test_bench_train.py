"""The benchmark harnesses run, and both systems compute the same thing (first loss, greedy tokens)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qlora

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_cpu_run_gives_the_same_first_loss_in_both_systems():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    src = os.path.dirname(os.path.dirname(qlora.__file__))
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--shape", "tiny", "--seq", "32",
                          "--steps", "3", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(qlora|bnb-peft)\s+\S+\s+\S+\s+\S+\s+(\S+)$",
                                                                 out.stdout, re.M)}
    assert set(rows) == {"qlora", "bnb-peft"}, out.stdout
    assert abs(rows["qlora"] - rows["bnb-peft"]) < 1e-3


def test_tiny_cpu_decode_agrees_token_for_token_with_transformers_bitsandbytes():
    pytest.importorskip("bitsandbytes")
    src = os.path.dirname(os.path.dirname(qlora.__file__))
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--shape", "tiny", "--device", "cpu",
                          "--new-tokens", "16", "--warmup", "0", "--repeats", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "greedy tokens agree for the first 16 of 16" in out.stdout, out.stdout
