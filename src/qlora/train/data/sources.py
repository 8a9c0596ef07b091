"""Reading training records from local files or the `datasets` hub.

Every record keeps where it came from (file and line, item or row) so that a
bad record anywhere later in the pipeline can be reported precisely: a user
with a 50,000-line file needs the line number, not a stack trace.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora.errors import UsageError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One raw example: its fields and where it came from (``"data.jsonl line 7"``)."""

    fields: dict[str, Any]
    where: str


def demo_data_path() -> Path:
    """The small instruction dataset shipped for ``qlora demo`` (12 countries and their capitals, asked four ways)."""
    return Path(__file__).resolve().parents[2] / "data" / "demo.jsonl"


def load_records(source: str | Path, split: str = "train") -> list[Record]:
    """Read every record of a local file or a `datasets` hub dataset.

    Args:
        source: a ``.jsonl``, ``.json`` (a list or ``{"data": [...]}``), ``.csv``
            or ``.parquet`` file, or a hub dataset name when the ``datasets``
            library is installed.
        split: the split to load from a hub dataset.

    Raises:
        UsageError: unreadable or malformed file, unknown format, or no records.
    """
    path = Path(source)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise UsageError(
                f"{path}: unknown data format {path.suffix or '(no suffix)'!r}. "
                f"Give a file ending in {', '.join(LOCAL_SUFFIXES)}."
            )
        try:
            records = reader(path)
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} line {_line_of_byte(path, exc)}: not UTF-8 text ({exc.reason} at byte "
                             f"{exc.object[exc.start]:#04x}). Save the file as UTF-8 (e.g. iconv -f latin1 "
                             "-t utf-8).") from None
    elif path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        raise UsageError(f"{path}: data file not found (or not a regular file). Check the --data path.")
    else:
        records = _read_hub(str(source), split)
    if not records:
        raise UsageError(f"{source}: the dataset is empty; it needs at least one example.")
    return records


def _line_of_byte(path: Path, exc: UnicodeDecodeError) -> int:
    """The line of the first byte that is not UTF-8 (the decoder's offsets are per chunk, not per file)."""
    for line_no, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return line_no
    return 1


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"{path} line {line_no}: malformed JSON ({e.msg} at column {e.colno}). "
                    "Each line of a .jsonl file must be one complete JSON object."
                ) from None
            records.append(Record(_as_object(value, f"{path} line {line_no}"), f"{path} line {line_no}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UsageError(f'{path}: a .json dataset must be a list of objects or {{"data": [...]}}.')
    return [Record(_as_object(item, f"{path} item {i}"), f"{path} item {i}") for i, item in enumerate(value)]


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        # line_num is the physical line where the row ended, so quoted newlines keep it right.
        return [Record(dict(row), f"{path} line {reader.line_num}") for row in reader]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
            raise UsageError(f"{path} is not a readable parquet file ({exc}). Check the file, or convert "
                             "it to .jsonl.") from None
    else:
        try:
            import pandas as pd
        except ImportError:
            raise UsageError(
                f"{path}: reading .parquet needs pyarrow (pip install pyarrow) or pandas with a parquet "
                "engine; neither is installed. Or convert the file to .jsonl."
            ) from None
        rows = pd.read_parquet(path).to_dict(orient="records")
    return [Record(dict(row), f"{path} row {i}") for i, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"{name}: no such file, and hub datasets need the `datasets` library (pip install datasets). "
            f"Local data must end in {', '.join(LOCAL_SUFFIXES)}."
        ) from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many unrelated types; the user needs the message
        raise UsageError(f"{name}: could not load the dataset (split {split!r}) from the hub: {e}") from None
    return [Record(dict(row), f"{name}[{split}] row {i}") for i, row in enumerate(rows)]


def _as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a JSON object with the example's fields, got {type(value).__name__}.")
    return value
