"""An interrupt that lands in a finalizer stops the command instead of being printed and dropped (``interrupts_kept``,
around every command): ci71 saw a two-rank run's stopped rank print regex's ``Group.__del__`` traceback and go on."""

import subprocess
import sys
import textwrap

import pytest

from qlora_processes import SRC

SCRIPT = textwrap.dedent("""
    import signal, sys, time
    from qlora.sigterm import interrupts_kept

    if sys.argv[1] == "sigint-ignored":  # a job started in the background: SIGTERM is then the interrupt's signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    failure = KeyboardInterrupt if sys.argv[1] != "other" else ValueError

    class Finalized:
        def __del__(self):
            raise failure("in a finalizer")

    with interrupts_kept():
        try:
            Finalized()
            for _ in range(200):
                time.sleep(0.005)
            print("ran on")
        except KeyboardInterrupt:
            print("interrupted")
    print("hook restored", sys.unraisablehook is sys.__unraisablehook__)
""")


def _run(case: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("case", ["sigint", "sigint-ignored"])
def test_an_interrupt_raised_in_a_finalizer_interrupts_the_main_thread(case):
    proc = _run(case)
    assert proc.stdout.splitlines() == ["interrupted", "hook restored True"], proc
    assert proc.stderr == "", proc.stderr  # no "Exception ignored in" traceback


def test_other_exceptions_in_finalizers_are_still_reported_and_ignored():
    proc = _run("other")
    assert proc.stdout.splitlines() == ["ran on", "hook restored True"], proc
    assert "Exception ignored" in proc.stderr and "ValueError: in a finalizer" in proc.stderr, proc.stderr
