"""``--nproc N``: run the same ``qlora`` command in N processes with torchrun's own launcher, in this process.

torchrun's command line ends a run whose rank failed with the launcher's traceback and a failure report, after
each rank has printed the same error. Run here instead, every rank leaves its one-paragraph error in a folder
the launcher reads (:func:`report_error`), and the command prints each distinct one once and exits with the
failing rank's status: 2 for bad input, as a one-process run does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

_ERRORS = "QLORA_RANK_ERRORS"  # the folder ranks write their error messages to
_LAUNCHER = "QLORA_LAUNCHER_PID"  # the process whose end stops the ranks (:func:`follow_launcher`)
INTERRUPTED = "qlora: interrupted"  # a rank's word when a signal stopped it outside a training step
LAUNCHER_GRACE_S = 30  # what torchrun's launcher gives its ranks between its SIGTERM and its SIGKILL


def launch(nproc: int, argv: list[str], command: str) -> int:
    """Run ``python -m qlora *argv`` in ``nproc`` local processes; the command's exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:  # its reports, said below instead
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, set here so it prints no banner
    with tempfile.TemporaryDirectory(prefix="qlora-ranks-") as errors:
        os.environ[_ERRORS] = errors
        os.environ[_LAUNCHER] = str(os.getpid())
        try:
            torchrun.run(torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "qlora", *argv]))
        except ChildFailedError as exc:
            return _report(exc, Path(errors), command, nproc)
        except Exception as exc:  # Ctrl-C or a kill reached the launcher: the ranks were stopped with it
            stop = raised_within(exc, SignalException)
            if stop is None:
                raise
            return _interrupted(stop.sigval, Path(errors), command)
        finally:
            os.environ.pop(_ERRORS, None)
            os.environ.pop(_LAUNCHER, None)
    return 0


def follow_launcher() -> None:
    """In a rank: be sent SIGTERM when the launcher dies, whatever kills it, and end within
    :data:`LAUNCHER_GRACE_S` of it.

    Ctrl-C or SIGTERM reach the launcher, which stops its ranks (SIGTERM, then SIGKILL
    after that grace); SIGKILL gives it no chance, and its ranks trained on with nobody to
    report to. SIGTERM lets a training rank stop with the others at the next step and save a
    checkpoint, as when the user sends it. But a rank waiting in a collective for a rank that
    is gone or stuck runs no Python signal handler until the collective returns (gloo waits
    30 minutes): a thread ends it once the grace is over, as the launcher's SIGKILL would
    have. Linux only (``prctl``); elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    launcher = int(os.environ.get(_LAUNCHER) or os.getppid())  # torchrun's own command line: its agent
    threading.Thread(target=_end_after, args=(launcher,), name="qlora-follow-launcher", daemon=True).start()
    if os.getppid() != launcher:  # the launcher died before prctl above
        os.kill(os.getpid(), signal.SIGTERM)


def _end_after(launcher: int) -> None:
    """Once ``launcher`` is gone (this process was handed to another parent) and the grace is over: end this rank,
    saying so where its launcher would have."""
    while os.getppid() == launcher:
        time.sleep(0.5)
    time.sleep(LAUNCHER_GRACE_S)
    os.write(2, (f"qlora: error: rank {os.environ.get('RANK', '?')} did not stop within {LAUNCHER_GRACE_S} s of "
                 "its launcher's end (it waited for a rank that is gone or stuck) and was ended; a checkpoint being "
                 "written is left as a hidden temporary folder, and --resume continues from the last complete "
                 "one.\n").encode())
    os._exit(1)


def raised_within(exc: BaseException | None, kind: type) -> BaseException | None:
    """The ``kind`` among ``exc`` and the exceptions it was raised from or while handling. A signal that lands as
    torch's metrics wrapper starts timing a call surfaces as that wrapper's UnboundLocalError, raised while
    handling torchrun's SignalException (the agent's shutdown of the ranks ran all the same); Python wraps a
    KeyboardInterrupt raised in a class body's ``__set_name__`` (an import) in a RuntimeError."""
    seen = set()
    while exc is not None and not isinstance(exc, kind) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc if isinstance(exc, kind) else None


def _said(errors: Path) -> list[str]:
    """The ranks' messages, each distinct one once, in rank order."""
    said = sorted(errors.glob("rank-*.txt"), key=lambda p: (int(p.stem.split("-")[1]), p.stem))
    return list(dict.fromkeys(p.read_text() for p in said))


def _interrupted(signum, errors: Path, command: str) -> int:
    """The ranks' own word when a signal stopped them (training's step and checkpoint), else the signal's name;
    Ctrl-C's status 130 for SIGTERM too (a job scheduler's stop), 128 + the signal for the others."""
    messages = _said(errors)
    print("".join(messages) or f"qlora {command}: interrupted ({signum.name})\n", end="", file=sys.stderr)
    return 130 if signum in (signal.SIGINT, signal.SIGTERM) else 128 + int(signum)


def _report(exc, errors: Path, command: str, nproc: int) -> int:
    """The failing rank's message first, naming it where the others did not say the same (its batch's non-finite
    loss, its out of memory), then the others' (the checkpoint a rank that lost contact names); not the bare
    "interrupted" of ranks the launcher stopped because of that failure, which no user interrupted.

    The failing rank is the first of those that failed with a message of their own, else of those killed without a
    word: a rank that lost contact with it, or that the launcher's stop interrupted, may be seen failing in the same
    second (torchrun's timestamps), and is a consequence."""
    def first_of(ranks: list[int]) -> int | None:
        return min(ranks, key=lambda r: (exc.failures[r].timestamp, r), default=None)

    failed = [r for r, f in exc.failures.items() if f.exitcode != 130]  # 130: stopped by a signal, and said so
    own = first_of([r for r in failed if (errors / f"rank-{r}.txt").exists()])
    killed = first_of([r for r in failed if not (errors / f"rank-{r}-lost.txt").exists()])
    rank = next(r for r in (own, killed, first_of(list(exc.failures))) if r is not None)
    code = exc.failures[rank].exitcode
    first = (errors / f"rank-{rank}.txt").read_text() if rank == own else None
    messages = [m for m in _said(errors) if m != first and (code == 130 or m != INTERRUPTED + "\n")]
    if first is not None:
        prefix = f"qlora {command}: error: "
        alike = sum(p.read_text() == first for p in errors.glob("rank-*.txt"))
        if alike < nproc and first.startswith(prefix):  # not every rank said it
            first = f"{prefix}rank {rank}: {first[len(prefix):]}"
        print(first, end="", file=sys.stderr)
    for message in messages:
        print(message, end="", file=sys.stderr)
    # the rank that failed first, if it said nothing (killed): named too, after the others' messages (lost contact)
    if first is None and code != 130:  # 130: the ranks were interrupted and said so
        said_by = "its output, if any, is above" if not messages else "the other ranks' messages are above"
        print(f"qlora {command}: error: rank {rank} of the run stopped with "
              f"{'signal ' + str(-code) if code < 0 else 'exit status ' + str(code)}; {said_by}.",
              file=sys.stderr)
    return code if code > 0 else 1


_KEPT: list[BaseException] = []  # a rank's failure and the frames its traceback holds, freed by end_rank's exit only


def keep_frames(exc: BaseException) -> None:
    """In a rank of a multi-process run, keep ``exc`` and the frames of its traceback (a failed ``qlora train``'s
    trainer, its DDP or FSDP model) alive until :func:`end_rank`: freed as the error is handled, they would free
    the model, and with it gloo's process group, the teardown ``end_rank`` exists to skip."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _KEPT.append(exc)


def end_rank(status: int) -> NoReturn:
    """End a rank of a multi-process run with ``status``, its output flushed, without Python's teardown of its
    objects. Its work is written and its process group left by then; but freeing a DDP or FSDP model frees, from
    C++ and holding the GIL, the gloo process group it still references, whose destructor joins worker threads
    that may need the GIL to free the tensors of the last collective: the rank then never ends (pytorch#56297;
    seen as a rank stuck after its run returned, with its launcher waiting for it). A command's function calls
    this while its model is alive, as ``python -m qlora`` does for any other command's rank. An output that cannot
    take what is left (a pipe whose reader is gone, a full disk) loses it, not the ending: a flush that raised went
    on into that teardown instead."""
    try:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # ValueError: a closed stream
                stream.flush()
    finally:
        os._exit(status)


def report_error(message: str, lost: bool = False) -> None:
    """Print a command's error, or under :func:`launch` leave it for the launcher to print once; ``lost``: the
    message of a rank that failed because another did (its collectives failed), said after that one's. A rank
    whose launcher is gone (killed: its ranks stopped at a checkpoint) prints it, or nobody would."""
    folder = os.environ.get(_ERRORS)
    rank = os.environ.get("RANK")
    launcher = os.environ.get(_LAUNCHER)
    if folder and rank is not None and launcher and os.getppid() == int(launcher) and Path(folder).is_dir():
        (Path(folder) / f"rank-{rank}{'-lost' if lost else ''}.txt").write_text(message + "\n")
    elif not (folder and rank not in (None, "0") and message == INTERRUPTED):  # every rank says it: rank 0 does
        print(message, file=sys.stderr)
