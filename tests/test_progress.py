"""Progress on a terminal is tqdm's live bar; on a pipe or file, plain lines now and then (no carriage-return
redraws flooding a log), with the same figures."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from qlora.progress import LineProgress, progress_bar

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")


def _train_argv(model_dir: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "qlora", "train", "--model", str(model_dir), "--data", str(data), "--output",
            str(out), "--optim", "adamw", "--max-steps", "4", "--seq-len", "32"]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_tenth_of_the_way_and_at_the_end():
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(total=25, unit="step", file=out, clock=clock)
    for _ in range(25):
        clock.now += 1.0
        bar.update(1)
        bar.set_postfix(loss="1.2345")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    counts = [int(line.split("/")[0]) for line in lines]
    assert counts == [3, 5, 8, 10, 13, 15, 18, 20, 23, 25]  # each crosses the next tenth; 25 once, at the end
    assert lines[-1] == "25/25 steps (100%), 00:25 elapsed, ETA 00:00, 1.00 steps/s, loss=1.2345"
    assert lines[0].startswith("3/25 steps (12%), 00:03 elapsed, ETA 00:22")


def test_a_slow_run_gets_a_line_at_least_every_interval():
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(total=1000, initial=100, unit="step", file=out, clock=clock, interval=60.0)
    for step in range(5):  # 5 steps of 61 s: far from the next tenth, but each after a minute
        clock.now += 61.0
        bar.update(1)
    assert [line.split(" ")[0] for line in out.getvalue().splitlines()] == ["101/1000", "102/1000", "103/1000",
                                                                           "104/1000", "105/1000"]
    bar.close()  # nothing new to say
    clock.now += 1.0
    bar.update(1)  # neither a tenth nor a minute: no line until the loop ends
    assert len(out.getvalue().splitlines()) == 5
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("106/1000 steps (10%), 05:06 elapsed, ETA ")


def test_bytes_are_shown_scaled():
    out = io.StringIO()
    bar = LineProgress(total=3 * 2**30, unit="B", unit_scale=True, desc="loading", file=out, clock=_Clock())
    bar.update(3 * 2**30)
    bar.close()
    assert out.getvalue().splitlines() == ["loading: 3.22GB/3.22GB (100%), 00:00 elapsed, ETA 00:00"]


def test_a_terminal_gets_tqdm_and_anything_else_lines():
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(10, file=Terminal()), tqdm)
    assert isinstance(progress_bar(10, file=io.StringIO()), LineProgress)
    off = progress_bar(10, enabled=False, file=io.StringIO())
    assert isinstance(off, tqdm) and off.disable


def test_train_piped_writes_lines_and_on_a_terminal_the_bar(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n"
                            for i in range(8)))
    piped = subprocess.run(_train_argv(tiny_model_dir, data, tmp_path / "piped"), capture_output=True, env=ENV,
                           timeout=300)
    assert piped.returncode == 0, piped.stderr
    err = piped.stderr.decode()
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if " steps (" in line]
    assert [line.split(" ")[0] for line in lines] == ["1/4", "2/4", "3/4", "4/4"]  # each a tenth or more
    assert all("loss=" in line and "lr=" in line for line in lines)  # each step's own record

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    process = subprocess.Popen(_train_argv(tiny_model_dir, data, tmp_path / "tty"), stdout=subprocess.DEVNULL,
                               stderr=follower, env=ENV)
    os.close(follower)  # the child holds the terminal now; reading ends when it exits
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's last writer has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    assert process.wait(timeout=300) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "\r" in shown and "4/4" in shown and " steps (" not in shown  # tqdm's bar, redrawn in place
