"""The cell separator of a CSV/TSV file whose header says it is not the one its suffix promises.

Excel in locales whose decimal mark is a comma (most of Europe) saves "CSV" with ``;`` between cells; tab- and
``|``-separated exports get named ``.csv`` too. Read with the suffix's separator, such a file is one column named
``instruction;input;output``, and the error that follows is about fields, not the file. Like ``csv.Sniffer``, but
only among ``, ; tab |`` and only from the header, where names hold no separator: the suffix's separator is kept
unless it leaves the header one name and exactly one other splits it into several.
"""

from __future__ import annotations

import csv
from pathlib import Path

from qlora.errors import UsageError

SEPARATORS = (",", ";", "\t", "|")


def header_separator(path: Path, header_line: str, expected: str) -> str:
    """The separator of the file whose first line is ``header_line``; ``expected`` is its suffix's (``,`` or tab).

    Raises:
        UsageError: the header splits into several names at more than one other separator.
    """
    if len(_names(header_line, expected)) > 1:
        return expected
    found = [sep for sep in SEPARATORS if sep != expected and len(_names(header_line, sep)) > 1]
    if len(found) > 1:
        raise UsageError(f"{path} line 1: the header is one column with {expected!r} between cells, and splits at "
                         f"each of {', '.join(map(repr, found))}: save it again with one separator (',' for .csv, a "
                         "tab for .tsv), the texts that hold it quoted.")
    return found[0] if found else expected


def _names(line: str, sep: str) -> list[str]:
    return [name for name in next(csv.reader([line], delimiter=sep), []) if name.strip()]
