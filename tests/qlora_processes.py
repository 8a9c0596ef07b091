"""Run ``python -m qlora`` as separate processes (multi-rank training), and read what a run logged (test helper)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_qlora(args: list[str], timeout: float = 300) -> str:
    """``python -m qlora ARGS`` with this checkout's code, one thread per process; its stderr. Fails the test on
    a non-zero exit, or past ``timeout`` seconds with every process's Python stacks (a hang says where it waits)."""
    # faulthandler: SIGABRT makes the launcher and each rank print all their threads' stacks to stderr first
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONFAULTHANDLER": "1"}
    with subprocess.Popen([sys.executable, "-m", "qlora", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torchrun starts each rank in a session of its own: the launcher's children are signalled one by one
            tree = [proc.pid, *children(proc.pid)]
            _signal(tree, signal.SIGABRT)
            time.sleep(2)  # the stacks are written
            _signal(tree, signal.SIGKILL)
            _, stderr = proc.communicate()
            raise AssertionError(f"qlora {' '.join(args)} ran past {timeout} s (killed with its ranks, whose stacks "
                                 f"end this message)\n{stderr[-12000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def kill_qlora(pids: list[int]) -> None:
    """SIGKILL those of ``pids`` that still run qlora (a rank that ended may have left its id to another process)."""
    for pid in pids:
        try:
            if b"qlora" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):  # ended meanwhile
            pass


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def train_records(out: Path) -> list[dict]:
    """The training steps' records of a run's ``metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def assert_same_run(out: Path, ref: Path, steps: int) -> None:
    """Run ``out`` equals run ``ref``: its ``steps`` steps' losses and gradient norms (the norm before clipping pins
    the gradient's scale, which Adam and clipping would hide) and its final adapter."""
    import torch
    from safetensors.torch import load_file

    got, want = train_records(out), train_records(ref)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=1e-5, atol=1e-6)
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
