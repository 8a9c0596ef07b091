"""A rank of ``qlora train --nproc 2`` that fails alone (its write to a full disk, its out of memory) ends the whole
run within seconds, with exit status 1 and its one message naming it; ranks whose launcher was killed end by
themselves, also while one of them is stuck.

The failure is put into one rank by a ``sitecustomize`` on that run's PYTHONPATH, which replaces a method of the
trainer in the process whose RANK it names: what a full disk or an exhausted memory does there, on cue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_processes import SRC, children, kill_qlora, train_records

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc")

SITE = """
import errno, os, time

rank, method, what = os.environ["QLORA_TEST_FAIL"].split(":")
if os.environ.get("RANK") == rank:
    from qlora.train.trainer import Trainer

    real = getattr(Trainer, method)

    def failing(self, *args, **kwargs):
        if what == "full-disk":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "config.yaml"))
        if what == "out-of-memory":
            raise MemoryError()
        if self.step >= 1:  # "stuck": from the second step on, this rank never comes back to the others
            while True:
                time.sleep(1)
        return real(self, *args, **kwargs)

    setattr(Trainer, method, failing)
"""

QA = [("What is two plus two?", "four"), ("Name a red fruit.", "An apple is red."), ("Say hello.", "Hello there!"),
      ("What colour is the sky?", "The sky is blue."), ("Count to three.", "one two three")]


def _launch(tmp_path: Path, model: Path, fail: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    """The run started; its stderr (the ranks' too: they outlive a killed launcher) goes to ``tmp_path/stderr``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qlora", "train", "--nproc", "2", "--model", str(model), "--data", str(data),
            "--output", str(out), "--batch-size", "1", "--seq-len", "32", "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{SRC}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "QLORA_TEST_FAIL": fail}
    with open(tmp_path / "stderr", "w") as stderr:
        return subprocess.Popen(argv, stderr=stderr, env=env, start_new_session=True), out


def _end(launcher: subprocess.Popen, ranks: list[int]) -> None:
    """Leave nothing behind: the launcher's session, and its ranks, which torchrun starts in sessions of their own."""
    kill_qlora([*ranks, *children(launcher.pid)])
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


@pytest.mark.slow
@pytest.mark.parametrize("fail,said", [
    # rank 0 alone writes: its full disk as it writes the run's config, once the ranks have built DDP and rank 1
    # waits in the first step's all-reduce (it waited at the clean-up barrier: both hung for gloo's 30 minutes)
    ("0:_write_config:full-disk", "qlora train: error: rank 0: could not access"),
    # rank 1's out of memory in a step (its clean-up hung in gloo's destructor in 2 runs of 3; when it did not, the
    # run said rank 0's "qlora: interrupted", which the launcher's stop caused, before rank 1's error)
    ("1:train_step:out-of-memory", "qlora train: error: rank 1: out of memory"),
    # rank 0's full disk in the final save, while rank 1 waits at the clean-up barrier
    ("0:_write_final:full-disk", "qlora train: error: rank 0: could not access"),
])
def test_a_rank_failing_alone_ends_the_run_with_one_message_naming_it(tmp_path, tiny_model_dir, fail, said):
    launcher, _ = _launch(tmp_path, tiny_model_dir, fail, "--max-steps", "2")
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while launcher.poll() is None:
            ranks = list({*ranks, *children(launcher.pid)})
            assert time.monotonic() < deadline, "the run hung after one rank failed"
            time.sleep(0.2)
    finally:
        _end(launcher, ranks)
    stderr = (tmp_path / "stderr").read_text()
    assert launcher.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("qlora")]
    assert errors[0].startswith(said), stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" not in stderr, stderr[-3000:]
    assert len(errors) <= 2 and all("lost contact" in line for line in errors[1:]), stderr[-3000:]


@pytest.mark.slow
def test_ranks_end_by_themselves_after_their_launcher_is_killed_also_when_one_is_stuck(tmp_path, tiny_model_dir):
    """SIGKILL to the launcher while rank 1 is stuck in its second step and rank 0 waits for it in that step's
    all-reduce: the kernel's SIGTERM sets a flag neither rank reads again (they lived on until gloo's 30-minute
    timeout); they end once the launcher's grace is over, as its SIGKILL would have ended them."""
    from qlora.cli.launch import LAUNCHER_GRACE_S

    launcher, out = _launch(tmp_path, tiny_model_dir, "1:train_step:stuck", "--max-steps", "100000",
                            "--logging-steps", "1")
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and train_records(out)):  # step 1 done: rank 1 is stuck next
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.2)
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        time.sleep(2)
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while any(Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
                  for pid in ranks):
            assert time.monotonic() < killed + LAUNCHER_GRACE_S + 90, "the ranks lived on after their launcher"
            time.sleep(0.5)
    finally:
        _end(launcher, ranks)
    stderr = (tmp_path / "stderr").read_text()
    # each rank says why it ended: its grace over, or (rank 0, when the stuck rank 1 was ended a moment before it)
    # the all-reduce it waited in broken by rank 1's end, which a loaded machine lets come first
    grace = stderr.count(f"did not stop within {LAUNCHER_GRACE_S} s of its launcher's end")
    lost = stderr.count("rank 0 lost contact with the other ranks")
    assert "rank 1 did not stop within" in stderr and grace + lost == 2, stderr[-3000:]


def test_the_launcher_says_the_failing_ranks_message_first_naming_it(tmp_path, capsys):
    """torchrun's timestamps are seconds: the ranks that lost contact with rank 2 as it left, or that the launcher's
    stop interrupted, are seen failing in the same second. Rank 2's own message comes first, named (it came after
    rank 0's "qlora: interrupted", and the run exited 130); the lost rank's follows; the interrupted one, which no
    user interrupted, is not heard. A rank killed without a word is named; bad input every rank said, once."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from qlora.cli import launch

    def failed(codes: dict[int, int]) -> ChildFailedError:
        failures = {}
        for rank, code in codes.items():
            failures[rank] = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code,
                                            error_file=str(tmp_path / "none"))
            failures[rank].timestamp = 1700000000
        return ChildFailedError("qlora", failures)

    errors = tmp_path / "errors"
    errors.mkdir()
    lost = "qlora train: error: rank 1 lost contact with the other ranks after step 3: ...\n"
    (errors / "rank-0.txt").write_text(launch.INTERRUPTED + "\n")
    (errors / "rank-1-lost.txt").write_text(lost)
    (errors / "rank-2.txt").write_text("qlora train: error: out of memory (...)\n")
    assert launch._report(failed({0: 130, 1: 1, 2: 1}), errors, "train", 3) == 1
    assert capsys.readouterr().err == "qlora train: error: rank 2: out of memory (...)\n" + lost

    (errors / "rank-2.txt").unlink()
    assert launch._report(failed({0: 130, 1: 1, 2: -9}), errors, "train", 3) == 1
    assert capsys.readouterr().err == lost + ("qlora train: error: rank 2 of the run stopped with signal 9; the "
                                              "other ranks' messages are above.\n")

    for name in ("rank-0.txt", "rank-1-lost.txt"):
        (errors / name).unlink()
    for rank in (0, 1):  # bad input, said by every rank: once, as one process says it
        (errors / f"rank-{rank}.txt").write_text("qlora train: error: --batch-size 2 x 2 ranks is more than ...\n")
    assert launch._report(failed({0: 2, 1: 2}), errors, "train", 2) == 2
    assert capsys.readouterr().err == "qlora train: error: --batch-size 2 x 2 ranks is more than ...\n"


def test_an_interrupt_python_wraps_in_another_error_is_said_as_an_interrupt(tmp_path, monkeypatch, capsys):
    """The launcher's SIGTERM reaching a rank as it imports matplotlib for loss.png (its clean-up after losing
    contact) raised in a class body's ``__set_name__``, which Python wraps in a RuntimeError: the rank printed
    that traceback. It is an interrupt: one line, status 130 (which the launcher knows for the stop it caused)."""
    import importlib

    from qlora.cli.main import COMMANDS, main

    class Interrupted:
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt

    def run(args):
        type("Regex", (), {"re": Interrupted()})  # what the interrupted import of pyparsing did

    monkeypatch.setattr(importlib.import_module(COMMANDS["train"][0]), "run", run)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["train", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "qlora: interrupted\n"


def test_a_rank_whose_launcher_is_gone_says_its_message_itself(tmp_path, monkeypatch, capsys):
    """Under a live launcher a rank's message goes to the launcher's folder; once the launcher is gone (SIGKILL),
    nobody would read it there: the rank prints it, and the interrupt every rank says is said by rank 0 alone."""
    from qlora.cli import launch

    folder = tmp_path / "errors"
    folder.mkdir()
    monkeypatch.setenv(launch._ERRORS, str(folder))
    monkeypatch.setenv(launch._LAUNCHER, str(os.getppid()))
    monkeypatch.setenv("RANK", "1")
    launch.report_error("qlora train: error: out of memory")
    assert (folder / "rank-1.txt").read_text() == "qlora train: error: out of memory\n"
    assert capsys.readouterr().err == ""

    monkeypatch.setenv(launch._LAUNCHER, "1")  # the launcher died: the rank was handed to init
    launch.report_error(launch.INTERRUPTED)
    launch.report_error("qlora train: error: rank 1 lost contact ...", lost=True)
    assert capsys.readouterr().err == "qlora train: error: rank 1 lost contact ...\n"
    monkeypatch.setenv("RANK", "0")
    launch.report_error(launch.INTERRUPTED)
    assert capsys.readouterr().err == launch.INTERRUPTED + "\n"
    assert [p.name for p in folder.iterdir()] == ["rank-1.txt"]


def test_a_rank_whose_output_is_gone_still_ends_with_its_status():
    """end_rank ends a rank without Python's teardown (which can hang on a DDP model's process group); a flush
    that fails (stdout a pipe whose reader is gone: ``qlora train --nproc 2 | head``) raised out of it instead, and
    the rank went into that teardown with a traceback and status 1."""
    code = ("import os, sys\n"
            "reader, writer = os.pipe()\n"
            "os.close(reader)\n"
            "sys.stdout = os.fdopen(writer, 'w')\n"
            "print('trained 2 steps')  # buffered, flushed by end_rank\n"
            "from qlora.cli.launch import end_rank\n"
            "end_rank(3)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("ranks", ["1", "2"])
def test_a_failed_ranks_model_is_not_freed_as_its_error_is_handled(tmp_path, monkeypatch, ranks):
    """A rank's error reached ``main`` with the trainer (its DDP model, holding gloo's process group) in the frames
    of its traceback: handling the error freed them, the teardown that can hang a rank (pytorch#56297) before
    ``end_rank`` ends it without one. They are kept until then; a one-process run frees them as before."""
    import gc
    import importlib
    import weakref

    from qlora.cli import launch
    from qlora.cli.main import COMMANDS, main
    from qlora.errors import UsageError

    class Model:
        pass

    alive = []

    def run(args):
        model = Model()
        alive.append(weakref.ref(model))
        raise UsageError("--batch-size 2 x 2 ranks is more than the 3 examples")

    monkeypatch.setattr(importlib.import_module(COMMANDS["train"][0]), "run", run)
    monkeypatch.setattr(launch, "_KEPT", [])
    monkeypatch.setenv("WORLD_SIZE", ranks)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["train", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "out")]) == 2
    gc.collect()
    assert (alive[0]() is not None) == (ranks == "2")
