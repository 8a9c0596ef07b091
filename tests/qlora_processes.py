"""Run ``python -m qlora`` as separate processes (multi-rank training), and read what a run logged (test helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_qlora(args: list[str]) -> None:
    """``python -m qlora ARGS`` with this checkout's code, one thread per process; fails the test on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "qlora", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def train_records(out: Path) -> list[dict]:
    """The training steps' records of a run's ``metrics.jsonl``."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]
