"""User-facing errors shared by every layer.

Library code raises :class:`UsageError` for bad input (a file, a line, an
option) with a one-paragraph message that says what is wrong and what to do.
The ``qlora`` command prints it and exits with status 2, without a traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user; the CLI maps it to exit status 2."""

    exit_code = 2
