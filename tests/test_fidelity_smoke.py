"""The fidelity benchmark runs end to end at smoke scale and records what a GPU run will need.

Smoke-scale numbers say nothing about the paper's claim; this only keeps the
harness working so the GPU run is a single command.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fidelity_smoke(tmp_path: Path) -> None:
    out = tmp_path / "fid"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fidelity.py"), "--scale", "cpu-smoke",
                           "--out", str(out), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| qlora-nf4-dq |" in proc.stdout
    results = json.loads((out / "results.json").read_text())

    assert set(results["zero_shot"]) == {"dense", "nf4-dq", "nf4", "fp4-dq", "int4-dq"}
    assert all(math.isfinite(row["loss"]) for row in results["zero_shot"].values())
    methods = {"full", "lora16", "qlora-nf4-dq", "qlora-nf4", "qlora-fp4-dq", "qlora-int4-dq"}
    assert set(results["finetune"]) == methods
    pretrained = results["pretrained_task"]["loss"]
    for name, row in results["finetune"].items():
        assert len(row["runs"]) == 3 and all(math.isfinite(r["eval_loss"]) for r in row["runs"]), name
        assert row["eval_loss"] < pretrained, (name, row["eval_loss"], pretrained)

    prov = results["provenance"]
    assert prov["python"] and prov["train_files"] > 0 and prov["held_out_files"] > 0
    assert prov["train_bytes"] > 0 and prov["held_out_bytes"] > 0 and prov["held_out_paths"]
    assert results["task"]["train_pairs"] > 0 and results["task"]["eval_pairs"] > 0
    assert (out / "results.md").read_text().startswith("Scale `cpu-smoke`")
    assert (out / "fidelity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
