"""Run ``python -m qlora`` as separate processes (multi-rank training), and read what a run logged (test helper)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_qlora(args: list[str]) -> str:
    """``python -m qlora ARGS`` with this checkout's code, one thread per process; its stderr. Fails the test on
    a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # its own process group: a run past the timeout is killed with its ranks, which would spin on otherwise
    with subprocess.Popen([sys.executable, "-m", "qlora", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            raise AssertionError(f"qlora {' '.join(args)} ran past 300 s (killed with its ranks)\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def train_records(out: Path) -> list[dict]:
    """The training steps' records of a run's ``metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]
