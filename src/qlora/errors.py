"""User-facing errors shared by every layer.

Library code raises :class:`UsageError` for bad input (a file, a line, an
option) with a one-paragraph message that says what is wrong and what to do.
The ``qlora`` command prints it and exits with status 2, without a traceback.

Failures of the environment rather than of the input (a disk that fills up,
a folder that turns read-only mid-run, an I/O error) arrive as
:class:`OSError`; the command reports them in one line with what to do and
exits with status 1 (see :func:`describe_os_error`); so does memory that runs
out (``qlora.cli.main``). Exit statuses of
``qlora``: 0 success, 1 environment failure, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import errno


class UsageError(ValueError):
    """Bad input from the user; the CLI maps it to exit status 2."""

    exit_code = 2


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write to another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EROFS: "the filesystem is read-only: choose a writable folder",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
}


def describe_os_error(exc: OSError) -> str:
    """One paragraph for a failed read or write: the file, the cause, what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    advice = _ADVICE.get(exc.errno, "check the disk and the path, then run the command again")
    return (f"could not access{where}: {exc.strerror or exc} ({advice}). Files already completed (earlier "
            "checkpoints, outputs) were left as they were; nothing half-written was kept.")
