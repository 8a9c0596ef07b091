"""What the side-by-side benchmarks share: one subprocess per system, and the
device and package versions printed above each table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch


def run_worker(script: str, system: str, argv: list[str]) -> dict[str, Any]:
    """Run ``script --worker --system system *argv`` in its own process (clean memory
    peaks; one system running out of memory does not stop the other) and return the
    JSON it prints last, or ``{"system", "error"}``."""
    proc = subprocess.run([sys.executable, script, "--worker", "--system", system, *argv],
                          capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        oom = "out of memory" in proc.stderr.lower()
        return {"system": system, "error": "out of memory" if oom else proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(device: str, packages: tuple[str, ...]) -> str:
    """``"<GPU name or CPU>; torch X, qlora Y, <package> Z, ..."`` for the installed ``packages``."""
    import qlora

    versions = f"torch {torch.__version__}, qlora {qlora.__version__}"
    for name in packages:
        try:
            versions += f", {name} {__import__(name).__version__}"
        except ImportError:
            pass
    return f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; {versions}"
