"""Which model names can only be local paths: a typo among them is refused at once, not after the seconds of imports
loading starts with, while a name that may be a hub id (``org/name``) is left to the loader.

Imports nothing heavy: the CLI checks ``--model`` with it before torch is imported.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from ..errors import UsageError


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path: it starts with ``.``, ``/`` or ``~``, or holds a separator no hub id
    holds (a second ``/``, or the system's own separator where that is not ``/``)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or any(sep and sep != "/" and sep in name for sep in (os.sep, os.altsep)))


def check_model_path(name: str, option: str = "--model") -> None:
    """Refuse ``name`` when it can only be a local path and nothing is there.

    Raises:
        UsageError: naming the path as given and as resolved, and a close name in its folder if there is one.
    """
    if not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if path.exists():
        return
    parent = path.absolute().parent
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, sorted(p.name for p in parent.iterdir()), n=1)
        hint = f" (did you mean {parent / close[0]}?)" if close else ""
    else:
        hint = f" ({parent} does not exist)"
    raise UsageError(f"{option} {name}: {path.absolute()} does not exist{hint}; check the path, or give a hub id such "
                     "as meta-llama/Meta-Llama-3-8B.")
