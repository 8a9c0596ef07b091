"""Run a test module as a script under Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined (at import), so
interpreted checks run in a fresh process with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"


def run_interpreted(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(_SRC), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout)
