"""The cell separator of a CSV/TSV file whose first lines say it is not the one its suffix promises.

Excel in locales whose decimal mark is a comma (most of Europe) saves "CSV" with ``;`` between cells; tab- and
``|``-separated exports get named ``.csv`` too. Read with the suffix's separator, such a file is one column named
``instruction;input;output``, and the error that follows is about fields, not the file. Like ``csv.Sniffer``, but
only among ``, ; tab |``: the suffix's separator is kept unless it leaves the header one name and exactly one other
splits it into several, or its rows do not line up under the header's names while exactly one other separator's
do (a ``;`` file whose header names hold commas: ``name;"price, EUR"``). A comma file whose quoted texts hold ``;``
lines up under its commas, so it keeps them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from qlora.errors import UsageError

SEPARATORS = (",", ";", "\t", "|")
SAMPLE_LINES = 50  # the first lines whose rows are compared with the header


def header_separator(path: Path, lines: list[str], expected: str, complete: bool = True) -> str:
    """The separator of the file whose first lines are ``lines`` (the header first); ``expected`` is its suffix's
    (``,`` or tab). ``complete``: ``lines`` is the whole file (else its last row may be cut, and is not compared).

    Raises:
        UsageError: the header splits into several names at more than one other separator.
    """
    header = lines[0] if lines else ""
    if len(_names(header, expected)) > 1:
        if _lines_up(lines, expected, complete):
            return expected
        others = [sep for sep in SEPARATORS
                  if sep != expected and len(_names(header, sep)) > 1 and _lines_up(lines, sep, complete)]
        return others[0] if len(others) == 1 else expected
    found = [sep for sep in SEPARATORS if sep != expected and len(_names(header, sep)) > 1]
    if len(found) > 1:
        raise UsageError(f"{path} line 1: the header is one column with {expected!r} between cells, and splits at "
                         f"each of {', '.join(map(repr, found))}: save it again with one separator (',' for .csv, a "
                         "tab for .tsv), the texts that hold it quoted.")
    return found[0] if found else expected


def _names(line: str, sep: str) -> list[str]:
    return [name for name in next(csv.reader([line], delimiter=sep), []) if name.strip()]


def _lines_up(lines: list[str], sep: str, complete: bool) -> bool:
    """Whether every row under the header has as many cells as the header (empty extra cells, a trailing
    separator, aside)."""
    header, *rows = [cells for cells in csv.reader(lines, delimiter=sep) if cells]
    if not complete:
        rows = rows[:-1]
    width = len(header)
    return all(len(cells) >= width and not any(cells[width:]) for cells in rows)
