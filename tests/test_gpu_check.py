"""scripts/gpu_check.sh in its CPU dry run: every step runs, the CUDA tests are listed per
file, the training checks accept a falling loss and reject a rising one, and every flag
the script passes to `qlora train` / `qlora generate` exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
HELPER = ROOT / "scripts" / "gpu_check.py"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=full_env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_dry_run_passes_and_fails_where_it_should(tmp_path):
    ok = _run(tmp_path / "ok")
    summary = (tmp_path / "ok" / "summary.txt").read_text()
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-2000:]
    for step in ("environment", "cuda_tests", "train_smoke", "generate_smoke", "benches"):
        assert any(line.startswith(step) and " OK " in line for line in summary.splitlines()), summary
    listing = (tmp_path / "ok" / "cuda_tests.log").read_text()
    for file in ("tests/test_triton_dequant.py", "tests/test_quant_cuda_scheme.py", "tests/test_optim_cuda.py"):
        assert file in listing
    assert "train loss: first" in (tmp_path / "ok" / "train_smoke.log").read_text()
    assert json.loads((tmp_path / "ok" / "train_metrics.jsonl").read_text().splitlines()[0])["split"] == "train"

    bad = _run(tmp_path / "bad", QLORA_GPU_CHECK_STUB_LOSS="rising", GPU_CHECK_STEPS="train_smoke")
    assert bad.returncode == 1
    summary = (tmp_path / "bad" / "summary.txt").read_text()
    assert "cuda_tests" not in summary  # only the step asked for ran
    assert any(line.startswith("train_smoke") and "FAIL" in line for line in summary.splitlines()), summary
    assert "loss did not fall" in (tmp_path / "bad" / "train_smoke.log").read_text()


def test_helpers_check_flags_and_summarize_junit(tmp_path):
    help_file = tmp_path / "help.txt"
    help_file.write_text("usage: qlora train [--model MODEL] [--max-steps N]")
    run = lambda *a: subprocess.run([sys.executable, str(HELPER), *a], capture_output=True, text=True)  # noqa: E731
    assert run("check-flags", str(help_file), "--model", "--max-steps").returncode == 0
    missing = run("check-flags", str(help_file), "--model", "--max-stepz")
    assert missing.returncode == 1 and "--max-stepz" in missing.stdout
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_a" name="t1" file="tests/test_a.py"/>'
        '<testcase classname="tests.test_a" name="t2" file="tests/test_a.py"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b.TestX" name="t3"><skipped/></testcase>'
        '<testcase classname="tests.test_b" name="t4"/>'
        '</testsuite></testsuites>')
    summary = run("test-summary", str(junit))
    assert summary.returncode == 1  # one failure
    lines = {line.split()[0]: line.split()[1:] for line in summary.stdout.splitlines()[1:]}
    assert lines["tests/test_a.py"] == ["1", "1", "0"] and lines["tests/test_b.py"] == ["1", "0", "1"]
    assert lines["total"] == ["2", "1", "1"]
