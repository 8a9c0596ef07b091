"""Reading training records from local files, saved datasets or the `datasets` hub.

Every record keeps where it came from (file and line, item or row) so that a
bad record anywhere later in the pipeline can be reported precisely: a user
with a 50,000-line file needs the line number, not a stack trace.

Text formats (.jsonl, .json, .csv, .txt) are read here line by line, which is
what lets an error name the line, and so is each file of a folder of data files
(``datasets`` picks the split's files); folders written by
``Dataset.save_to_disk``, folders of other formats (images) and hub names go
through the `datasets` library, the data layer users already know.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from qlora.errors import UsageError
from qlora.model.local_path import near_local_path
from qlora.train.data.class_labels import label_names, schema_features, with_label_names
from qlora.train.data.csv_separator import SAMPLE_LINES, header_separator
from qlora.train.data.struct_nulls import has_struct_payloads, without_struct_nulls
from qlora.train.data.unique_keys import DuplicateKey, duplicate_line, loads_unique, loads_unique_prefix

LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")


def _zstd_open(path: Path, mode: str, **text_options: Any):
    """Read a zstd-compressed file (hub corpora ship ``.jsonl.zst`` shards) through the optional ``zstandard``
    package, as datasets reads them. Each frame must reach its end: zstandard's streaming reader returns a cut
    file's first part without a word, where gzip raises ``EOFError``, as this does."""
    try:
        import zstandard
    except ImportError:
        raise UsageError(f"{path} is zstd-compressed: reading it needs the zstandard package (pip install zstandard, "
                         f"as datasets needs it), or decompress it first (zstd -d {path.name}).") from None
    data, parts = Path(path).read_bytes(), []
    while data:  # one frame after another (pzstd and concatenated files hold several)
        frame = zstandard.ZstdDecompressor().decompressobj()
        parts.append(frame.decompress(data))
        if not frame.eof:
            raise EOFError("Compressed file ended before the end-of-frame marker was reached")
        data = frame.unused_data
    raw = io.BytesIO(b"".join(parts))
    return raw if "b" in mode else io.TextIOWrapper(raw, **text_options)


# Compressed text files (data.jsonl.gz, data.csv.xz) are read through these, as datasets reads them.
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open}
COMPRESSED_SUFFIXES = tuple(_COMPRESSED)
# ... and by their first bytes where the name does not say (a gzip file saved as data.jsonl, which datasets reads)
_MAGIC = {b"\x1f\x8b": gzip.open, b"\xfd7zXZ\x00": lzma.open, b"\x28\xb5\x2f\xfd": _zstd_open,
          **{b"BZh%d1AY&SY" % level: bz2.open for level in range(1, 10)}}  # bzip2's header, then its first block's
_TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt")
# GPT-2's end-of-text token, written between the documents of plain-text corpora (TinyStoriesV2's .txt files,
# OpenWebText dumps): such a file's records are its documents, not its lines.
DOCUMENT_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class Record:
    """One raw example: its fields and where it came from (``"data.jsonl line 7"``)."""

    fields: dict[str, Any]
    where: str
    # where the row's relative image paths start: its local data file's folder, then the --data folder that file
    # was found in (a hub-style folder's data/train.jsonl may name images beside it or from the folder's top)
    folders: tuple[str, ...] = ()

    def image_folders(self, media_dir: str | None) -> list[str]:
        """The folders a relative image path of this row is looked for in, in order (``media_dir`` last)."""
        return list(dict.fromkeys(f for f in (*self.folders, media_dir) if f))


def demo_data_path() -> Path:
    """The small instruction dataset shipped for ``qlora demo`` (12 countries and their capitals, asked four ways)."""
    return Path(__file__).resolve().parents[2] / "data" / "demo.jsonl"


def load_records(source: str | Path, split: str = "train", subset: str | None = None, *,
                 text_lines: bool = False, as_text: bool = False, split_option: str = "--data-split",
                 subset_option: str = "--data-subset") -> list[Record]:
    """Read every record of a local file or folder, or of a hub dataset.

    Args:
        source: a glob pattern of such files (``shards/*.jsonl``, ``data/**/*.parquet``: :func:`glob_files`), or a
            ``.jsonl`` (or ``.ndjson``), ``.json`` (a list, ``{"data": [...]}`` or one row's object), ``.csv``,
            ``.tsv``, ``.parquet``, ``.arrow`` or ``.txt`` file (plain text: one record a document where
            ``<|endoftext|>`` separates them, else a paragraph, or a line when the file has no blank line), the text ones also compressed (``.gz``,
            ``.bz2``, ``.xz``); a folder written by ``datasets``' ``save_to_disk``, or a folder
            of data files; or a hub dataset name.
        split: the split of a hub dataset, saved ``DatasetDict`` or data folder.
        subset: the configuration (subset) of a hub dataset, if it has several.
        text_lines: read a ``.txt`` file one record a non-blank line, even where blank lines separate
            paragraphs (as ``datasets``' text loader, which LLaMA-Factory uses, reads it).
        as_text: read a file as plain text whatever its suffix (axolotl's ``ds_type: text``).
        split_option: the option that gave ``split``, named where the split is not there (``--eval-data-split``
            for --eval-data).
        subset_option: the option that gave ``subset``, named where the subset is not there or one is needed
            (``--eval-data-subset`` for --eval-data).

    Raises:
        UsageError: unreadable or malformed file, unknown format, unknown
            split or subset, unreachable hub, or no records.
    """
    path = Path(source).expanduser()
    matched = glob_files(source)
    if matched is not None:
        if not matched:
            raise UsageError(f"{source}: no such file, and no file matches it as a glob pattern (it holds *, ? or "
                             "[). Check the path given (--data or --eval-data).")
        records = [replace(r, folders=(str(p.parent),)) for p in matched for r in _read_file(p, text_lines, as_text)]
    elif path.is_file():
        records = _read_file(path, text_lines, as_text)
    elif path.is_dir():
        records = _read_folder(path, split, subset, text_lines, as_text, split_option, subset_option)
    elif _format_suffix(path) in LOCAL_SUFFIXES or path.exists() or str(source).startswith((".", "/", "~")):
        raise UsageError(f"{path}: data file not found (or not a regular file). Check the path given (--data or "
                         f"--eval-data).{near_local_path(path)}")
    else:
        records = _read_hub(str(source), split, subset, split_option, subset_option)
    if not records:
        raise UsageError(f"{source}: the dataset is empty; it needs at least one example.")
    if path.exists():
        folder = str(path if path.is_dir() else path.parent)
        records = [replace(r, folders=(*r.folders, folder)) for r in records]
    return records


def glob_files(source: str | Path) -> list[Path] | None:
    """The files a glob pattern names (``*``, ``?``, ``[...]``; ``**`` for any depth), sorted, as ``datasets`` reads a
    ``data_files`` pattern and a user writes a sharded corpus (``train-*.jsonl.gz``); None where ``source`` is not a
    pattern, or is an existing path whose name holds such a character."""
    text = os.path.expanduser(str(source))
    if not any(c in text for c in "*?[") or Path(text).exists():
        return None
    return sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())


def _read_file(path: Path, text_lines: bool = False, as_text: bool = False) -> list[Record]:
    """The records of one local data file, read by qlora itself (each names its file and line, item or row)."""
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".tsv": _read_tsv, ".parquet": _read_parquet, ".arrow": _read_arrow, ".txt": _read_text}
    reader = _read_text if as_text else readers.get(_format_suffix(path))
    if reader is None:
        raise UsageError(
            f"{path}: unknown data format {''.join(path.suffixes[-2:]) or '(no suffix)'!r}. Give a file ending "
            f"in {', '.join(LOCAL_SUFFIXES)} (text ones also compressed: .gz, .bz2, .xz, .zst), a folder written by "
            f"save_to_disk, or a hub dataset name.{_decompress_hint(path)}"
        )
    if text_lines and reader is _read_text:
        reader = _read_lines
    _refuse_lfs_pointer(path)
    try:
        records = reader(path)
    except _damaged_stream() as exc:  # a damaged compressed file (a bad gzip header, a cut stream)
        if _opener(path) is None:
            raise
        raise UsageError(f"{path}: cannot be decompressed ({type(exc).__name__}: {exc}). Download or copy it "
                         "again.") from None
    except UnicodeDecodeError as exc:
        raw = _read_bytes(path)
        raise UsageError(f"{path} line {_line_of_byte(raw)}: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.object[exc.start]:#04x}). {_save_as_utf8(raw)}") from None
    return records


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _refuse_lfs_pointer(path: Path) -> None:
    """Refuse a Git LFS pointer (the few lines git leaves in place of a large file when a dataset repository is
    cloned without git-lfs): read as data, it is a malformed first line or a "corrupted" parquet file."""
    with path.open("rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise UsageError(f"{path} is a Git LFS pointer, not the data: the repository was cloned without its large "
                         "files. Fetch them (git lfs install, then git lfs pull in the repository), or download the "
                         "dataset with huggingface-cli download --repo-type dataset.")


def _damaged_stream() -> tuple[type[BaseException], ...]:
    """What a damaged compressed file raises while read: zstandard's own error once that package was imported."""
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError) + ((zstd.ZstdError,) if zstd is not None else ())


def _decompress_hint(path: Path) -> str:
    """For a file compressed in a way qlora does not read (lz4, ...): decompress it."""
    if len(path.suffixes) < 2 or path.suffixes[-2].lower() not in _TEXT_SUFFIXES + (".parquet", ".arrow"):
        return ""
    return f" It looks compressed ({path.suffix}): decompress it first, e.g. to {path.with_suffix('').name}."


def _format_suffix(path: Path) -> str:
    """The suffix naming the data format: ``.jsonl`` for ``data.jsonl`` and for ``data.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in _COMPRESSED and suffixes[-2] in _TEXT_SUFFIXES:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path, newline: str | None = None):
    """``path`` as UTF-8 text, decompressed if its name says so; a byte-order mark (Windows editors,
    Excel) is not data."""
    opener = _opener(path)
    if opener is None:
        return path.open(encoding="utf-8-sig", newline=newline)
    return opener(path, "rt", encoding="utf-8-sig", newline=newline)


def _opener(path: Path):
    """The decompressing ``open`` of a compressed text file, by its suffix or else its first bytes; None for
    plain text."""
    opener = _COMPRESSED.get(path.suffix.lower())
    if opener is not None:
        return opener
    with path.open("rb") as f:
        head = f.read(10)
    return next((opener for magic, opener in _MAGIC.items() if head.startswith(magic)), None)


def _read_bytes(path: Path) -> bytes:
    opener = _opener(path)
    if opener is None:
        return path.read_bytes()
    with opener(path, "rb") as f:
        return f.read()


def _line_of_byte(raw: bytes) -> int:
    """The line of the first byte that is not UTF-8 (the decoder's offsets are per chunk, not per file)."""
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return line_no
    return 1


def _save_as_utf8(raw: bytes) -> str:
    """How to convert a file that is not UTF-8: from UTF-16 or UTF-32 where its byte-order mark says so (what
    Windows PowerShell and Excel's "Unicode text" write), else from a legacy one-byte encoding: Windows' cp1252
    where bytes 0x80-0x9F (its curly quotes, dashes, euro sign) are there, which latin1 reads as control
    characters."""
    for mark, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                           (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(mark):
            return (f"Its byte-order mark says it is {encoding.upper()} text: save it as UTF-8 (e.g. iconv -f "
                    f"{encoding} -t utf-8).")
    if re.search("[\udc80-\udc9f]", raw.decode("utf-8", "surrogateescape")):  # such bytes that UTF-8 does not read
        return "Save the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8: it looks written on Windows, as Excel's CSV)."
    return "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."


def _nul_error(path: Path, line_no: int) -> UsageError:
    """A NUL byte is never text: a UTF-16 file without its byte-order mark, or a damaged one (a crash's zeros)."""
    return UsageError(f"{path} line {line_no}: holds NUL bytes, which no text has: the file is UTF-16 text (save it "
                      "as UTF-8, e.g. iconv -f utf-16 -t utf-8) or damaged (remove the line, or copy the file again).")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = loads_unique(line)
            except DuplicateKey as e:
                raise _duplicate_error(path, line_no, e.key) from None
            except json.JSONDecodeError as e:
                if "\x00" in line:
                    raise _nul_error(path, line_no) from None
                continues = e.msg.startswith("Unterminated") or e.pos >= len(line.rstrip())  # at the line's end
                if "\n" in line and not records:
                    spread = _spread_json(path, continues)
                    if spread is not None:
                        return spread
                raise UsageError(f"{path} line {line_no}: malformed JSON ({_problem(e)} at column {e.colno}). "
                                 + _json_line_hint(e, cut="\n" not in line and continues)) from None
            _check_surrogates(value, line, path, line_no)
            if not records and isinstance(value, list) and value and all(
                    isinstance(m, dict) and not {"role", "from"} & m.keys() for m in value):
                spread = _spread_json(path, continues=False)  # one JSON array of rows on the file's one line
                if spread is not None:
                    return spread
            records.append(Record(_as_object(value, f"{path} line {line_no}"), f"{path} line {line_no}"))
    return records


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_surrogates(value: Any, raw: str, path: Path, first_line: int = 1) -> None:
    """Refuse a JSON string holding half of a UTF-16 surrogate pair (``"\\ud83d"`` alone): the rest of an emoji
    that a cut at a fixed length (a scraper's, a JavaScript ``substring``) split. It is not text: no tokenizer
    encodes it (``datasets`` refuses the file too). Looked for only where ``raw`` holds such an escape at all."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return  # every such escape is half of a whole pair
    paired_to = -1
    for m in _SURROGATE_ESCAPE.finditer(raw):
        if m.start() < paired_to:
            continue
        following = _SURROGATE_ESCAPE.match(raw, m.end())
        if m.group()[3].lower() in "89ab" and following and following.group()[3].lower() in "cdef":  # \uD8..\uDC..
            paired_to = following.end()  # a high half and its low half: one character
            continue
        line = first_line + raw.count("\n", 0, m.start())
        column = m.start() - raw.rfind("\n", 0, m.start())
        raise UsageError(f"{path} line {line}: a string holds half of a UTF-16 surrogate pair ({m.group()} at column "
                         f"{column}), the rest of a character (an emoji) that a cut at a fixed length split; it is not "
                         "text, and no tokenizer encodes it. Remove that escape, or write \\ufffd (the replacement "
                         "character) in its place.")


def _problem(error: json.JSONDecodeError) -> str:
    """The decoder's message without its dangling "at" ("Unterminated string starting at")."""
    return error.msg.removesuffix(" at")


def _json_line_hint(error: json.JSONDecodeError, cut: bool) -> str:
    if cut:
        return ("The file ends inside this line: it looks cut off (an interrupted download, copy or write); copy it "
                "again, or remove the incomplete line.")
    return _raw_control(error) or "Each line of a .jsonl file must be one complete JSON object."


def _raw_control(error: json.JSONDecodeError) -> str:
    """What to do about a string holding a raw control character (a line break typed into a text), or ''."""
    if not error.msg.startswith("Invalid control character"):
        return ""
    return ("A string holds a raw line break or tab, which JSON writes escaped (\\n, \\t): write the file with a "
            "JSON library (json.dumps) rather than by hand.")


def _spread_json(path: Path, continues: bool) -> list[Record] | None:
    """A ``.jsonl`` file whose first object does not fit on its line (or is an array), read as ``datasets``' json
    loader reads it: one JSON document (an array of rows), or objects each written over several lines (``jq``'s
    output without ``-c``, ``json.dump(row, f, indent=2)`` per row). Where its first value does not parse either:
    None, so that the first line's own error is reported, unless that value ``continues`` past its first line,
    whose error is then where the value breaks."""
    with _open_text(path) as f:
        text = f.read()
    start = len(text) - len(text.lstrip())
    try:
        value, end = loads_unique_prefix(text, start)
    except DuplicateKey:
        raise _duplicate_error(path, *duplicate_line(text)) from None
    except json.JSONDecodeError as e:
        if not continues:
            return None
        raise UsageError(f"{path} line {e.lineno}: malformed JSON ({_problem(e)} at column {e.colno}), in the "
                         f"value starting at line {text.count(chr(10), 0, start) + 1}. {_raw_control(e)}".rstrip()
                         ) from None
    if not text[end:].strip():
        _check_surrogates(value, text, path)
        return _document_rows(value, text, path)
    return _object_stream(text, path) if isinstance(value, dict) else None


def _object_stream(text: str, path: Path) -> list[Record]:
    """JSON objects one after another, each named by the line where it starts."""
    records, pos, line_no, counted = [], _JSON_SPACE.match(text).end(), 1, 0
    while pos < len(text):
        line_no, counted = line_no + text.count("\n", counted, pos), pos
        try:
            value, end = loads_unique_prefix(text, pos)
        except DuplicateKey as e:
            raise _duplicate_error(path, line_no, e.key) from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {e.lineno}: malformed JSON ({_problem(e)} at column {e.colno}), in the "
                             f"value starting at line {line_no}. {_raw_control(e)}".rstrip()) from None
        _check_surrogates(value, text[pos:end], path, line_no)
        records.append(Record(_as_object(value, f"{path} line {line_no}"), f"{path} line {line_no}"))
        pos = _JSON_SPACE.match(text, end).end()
    return records


_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values


def _read_json(path: Path) -> list[Record]:
    with _open_text(path) as f:
        text = f.read()
    try:
        value = loads_unique(text)
    except DuplicateKey:
        raise _duplicate_error(path, *duplicate_line(text)) from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.doc.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON Lines named .json, as datasets' json loader (and axolotl) read it
        raise UsageError(f"{path} line {e.lineno}: malformed JSON ({_problem(e)} at column {e.colno}). "
                         f"{_raw_control(e)}".rstrip()) from None
    _check_surrogates(value, text, path)
    return _document_rows(value, text, path)


def _document_rows(value: Any, text: str, path: Path) -> list[Record]:
    """The rows of one JSON document: a list of rows or of texts, ``{"data": [...]}``, a table as pandas'
    ``DataFrame.to_json`` writes it (:func:`_pandas_rows`), or one object (one row)."""
    table = _pandas_rows(value) if isinstance(value, dict) else None
    if table is not None:
        return [Record(row, f"{path} row {label}") for label, row in table]
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    elif isinstance(value, dict):  # one row, named by the line where its object starts
        line_no = text[:len(text) - len(text.lstrip())].count("\n") + 1
        return [Record(_one_row(value, path), f"{path} line {line_no}")]
    if not isinstance(value, list):
        raise UsageError(f'{path}: a .json dataset must be a list of objects or of strings (texts), {{"data": [...]}} '
                         f"or one object (one row), not a {type(value).__name__}.")
    if value and all(isinstance(item, str) for item in value):  # datasets' json loader: a "text" column
        return [Record({"text": item}, f"{path} item {i}") for i, item in enumerate(value)]
    if any(isinstance(item, str) for item in value):  # datasets reads a mixed list as one Json column
        texts = isinstance(value[0], str)
        i = next(i for i, item in enumerate(value) if isinstance(item, str) != texts)
        raise UsageError(f"{path} item {i}: {'not ' * texts}a string, unlike item 0. A .json list holds rows "
                         "(objects) or plain texts (strings, each read as a \"text\" row), not both: write the "
                         "texts as {\"text\": ...} objects.")
    return [Record(_as_object(item, f"{path} item {i}"), f"{path} item {i}") for i, item in enumerate(value)]


def _pandas_rows(value: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]] | None:
    """The ``(index label, row)`` pairs of a DataFrame that ``to_json`` wrote with a default (range) index, as
    ``pandas.read_json`` reads them back: ``orient="columns"`` (its default: ``{column: {"0": value, ...}}``),
    ``"index"`` (``{"0": row, ...}``) or ``"split"`` (``{"columns", "index", "data"}``); None for other objects.
    ``datasets`` would read such a file as one row whose fields are dicts."""
    if set(value) in ({"columns", "data"}, {"columns", "index", "data"}):
        columns, data = value["columns"], value["data"]
        labels = value.get("index", list(range(len(data))))
        if (isinstance(columns, list) and all(isinstance(c, str) for c in columns) and isinstance(data, list)
                and isinstance(labels, list) and len(labels) == len(data)
                and all(isinstance(r, list) and len(r) == len(columns) for r in data)):
            return [(label, dict(zip(columns, r))) for label, r in zip(labels, data)]
        return None
    if not value or not all(isinstance(v, dict) for v in value.values()):
        return None
    if all(k.isdigit() for k in value):  # orient="index": rows under their labels
        return list(value.items())
    labels = list(next(iter(value.values())))
    if labels and all(k.isdigit() for k in labels) and all(list(v) == labels for v in value.values()):
        return [(label, {column: cells[label] for column, cells in value.items()}) for label in labels]
    return None


def _one_row(value: dict[str, Any], path: Path) -> dict[str, Any]:
    """The one object of a ``.json`` file (without ``"data"``) as one row, as ``datasets``' json loader reads it;
    refused where every field is a list of the same length: its rows under its one field (``datasets`` would need
    ``field=``), columns (``Dataset.to_dict()``'s) and one example whose fields are lists (a conversation) are
    each as likely, and a wrong guess trains nonsense."""
    lengths = {len(v) if isinstance(v, list) else None for v in value.values()}
    if len(lengths) != 1 or None in lengths:
        return value
    keys, n = list(value), lengths.pop()
    one = len(keys) == 1
    named = f"whose only field, {keys[0]!r}, holds" if one else f"whose fields {', '.join(map(repr, keys))} each hold"
    if one and all(isinstance(item, dict) for item in value[keys[0]]):
        reading = (f"the rows under {keys[0]!r}", f"For rows, give that list alone (e.g. jq '.{keys[0]}' {path.name} > "
                   f"{path.stem}-rows.json) or name the field \"data\"")
    else:
        reading = ("columns (as Dataset.to_dict() writes them)", "For columns, write one object per row (e.g. "
                   f"Dataset.from_dict(json.load(open('{path.name}'))).to_json('{path.stem}.jsonl'))")
    raise UsageError(f"{path}: one JSON object {named} a list of {n}: {reading[0]}, or one example whose "
                     f"field{' is a list' if one else 's are lists'}? {reading[1]}; for one example, put the object in "
                     "a list ([{...}]).")


def _duplicate_error(path: Path, line_no: int, key: str) -> UsageError:
    return UsageError(f"{path} line {line_no}: a JSON object names the key {key!r} twice, and only one of its values "
                      "could be read. Fix the program that wrote the file (or keep one of the two by hand).")


def _read_csv(path: Path, delimiter: str = ",") -> list[Record]:
    """Rows under the header's names; a row shorter than the header has nulls in its last columns (as pandas and
    ``datasets`` read it), while a row with more filled cells than the header, or a header naming a column twice,
    is refused: a text would otherwise be silently cut at an unquoted comma or lost under a repeated name. The
    separator is the suffix's unless the first lines show another (:mod:`csv_separator`: Excel's ``;``)."""
    with _open_text(path, newline="") as f:
        sample = list(itertools.islice(f, SAMPLE_LINES))
        found = header_separator(path, sample, delimiter, complete=len(sample) < SAMPLE_LINES)
        if found != delimiter:
            print(f"qlora: {path} has {found!r} between cells, not {delimiter!r}: reading it so.", file=sys.stderr)
            delimiter = found
        reader = csv.reader(itertools.chain(sample, f), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return []
        repeated = sorted({name for name in header if name and header.count(name) > 1})  # unnamed ones are unread
        if repeated:
            raise UsageError(f"{path} line 1: the header names the column{'s' * (len(repeated) > 1)} "
                             f"{', '.join(map(repr, repeated))} more than once, so a row's cells under that name "
                             "would overwrite each other. Rename the repeated columns.")
        records, ended, last = [], reader.line_num, 0
        # line_num is the physical line where a row ends: a row is named by the line it starts on (the line an
        # editor shows it at, as a JSON object written over several lines is), after the previous row's end
        for cells in reader:
            row_start, ended = ended + 1, reader.line_num
            if not cells:  # a blank line, as csv.DictReader skips it
                continue
            last = row_start
            if any("\x00" in cell for cell in cells):
                raise _nul_error(path, row_start)
            if any(cells[len(header):]):  # empty extra cells (a trailing separator) hold nothing to lose
                raise UsageError(
                    f"{path} line {row_start}: {len(cells)} cells, but the header has {len(header)} columns. "
                    f"A text holding the separator ({delimiter!r}) must be quoted (\"a, b\"); quote it, or remove "
                    "the extra cells.")
            records.append(Record(dict(zip(header, cells[:len(header)] + [None] * (len(header) - len(cells)))),
                                  f"{path} line {row_start}"))
    if records and ended > last:  # the last row spans lines: its quote may never close
        _refuse_open_quote(path, delimiter, last, ended)
    return records


def _refuse_open_quote(path: Path, delimiter: str, start: int, end: int) -> None:
    """Refuse a last row whose quoted cell never closes: Python's lenient reader (and pandas') makes the rest of the
    file that cell's text, the rows after it lost without a word (``datasets`` refuses the file)."""
    with _open_text(path, newline="") as f:
        try:
            for _ in csv.reader(itertools.islice(f, start - 1, None), delimiter=delimiter, strict=True):
                pass
        except csv.Error as exc:
            if "unexpected end of data" not in str(exc):
                return  # another liberty of a lenient writer (a quote inside a cell), read as pandas reads it
            after = f"line {end}" if end == start + 1 else f"lines {start + 1}-{end}"
            raise UsageError(f"{path} line {start}: a quote opens a cell of this row and never closes, so {after}, "
                             "to the end of the file, would be read as that cell's text. Close "
                             "the quote, or write a quote that is part of the text as two (\"\"); a file written "
                             "without quoting must have no cell starting with a quote.") from None


def _read_tsv(path: Path) -> list[Record]:
    return _read_csv(path, delimiter="\t")


def _read_text(path: Path) -> list[Record]:
    """Plain text: one record a document where ``<|endoftext|>`` separates them, else one a paragraph (blank-line
    separated), or one a line if no line inside is blank."""
    decoded = _decoded_lines(path)
    if any(DOCUMENT_SEPARATOR in line for line in decoded):
        return _documents("".join(decoded), path)
    lines = [line.rstrip("\n") for line in decoded]
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if not filled:
        return []
    if all(lines[i].strip() for i in range(filled[0], filled[-1] + 1)):
        return [Record({"text": lines[i]}, f"{path} line {i + 1}") for i in filled]
    records, block = [], []
    for i, line in enumerate(lines + [""]):
        if line.strip():
            block.append(i)
        elif block:
            records.append(Record({"text": "\n".join(lines[j] for j in block)}, f"{path} line {block[0] + 1}"))
            block = []
    return records


def _documents(text: str, path: Path) -> list[Record]:
    """The documents between ``<|endoftext|>`` separators, each whole (its paragraphs, lines and blank lines kept):
    a separator's place is the end of a text, which the text format trains as the model's EOS."""
    records, offset = [], 0
    for doc in text.split(DOCUMENT_SEPARATOR):
        lead = len(doc) - len(doc.lstrip("\n"))
        if doc.strip():
            line = text.count("\n", 0, offset + lead) + 1
            records.append(Record({"text": doc[lead:].rstrip()}, f"{path} line {line}"))
        offset += len(doc) + len(DOCUMENT_SEPARATOR)
    return records


def _read_lines(path: Path) -> list[Record]:
    return [Record({"text": line.rstrip("\n")}, f"{path} line {i + 1}")
            for i, line in enumerate(_decoded_lines(path)) if line.strip()]


def _decoded_lines(path: Path) -> list[str]:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path} line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}). "
                         f"{_save_as_utf8(raw)}") from None
    lines = io.StringIO(text, newline=None).readlines()  # universal newlines, and nothing else, end a line
    nul = next((i for i, line in enumerate(lines) if "\x00" in line), None)
    if nul is not None:
        raise _nul_error(path, nul + 1)
    return lines


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq  # installed with `datasets`, whose Parquet engine it is

    try:
        table = pq.read_table(path)
        features = schema_features(table.schema)  # the ClassLabel names of a file datasets wrote
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UsageError(f"{path} is not a readable parquet file ({exc}). Check the file, or convert "
                         "it to .jsonl.") from None
    return _rows(table.to_pylist(), str(path), features, table.schema)


def _read_arrow(path: Path) -> list[Record]:
    """An Arrow file: the stream ``datasets`` writes (``data-00000-of-00001.arrow``), memory-mapped, or the
    random-access file format that pyarrow's ``ipc.new_file``, Feather 2, polars and pandas write (as ``datasets``'
    ``arrow`` loader reads both)."""
    import datasets
    import pyarrow as pa

    try:
        return _rows(datasets.Dataset.from_file(str(path)), str(path))
    except Exception as exc:  # pyarrow's ArrowInvalid for anything that is not an Arrow stream
        stream_error = exc
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
    except Exception:  # ArrowInvalid again: neither an Arrow stream nor an Arrow file
        raise UsageError(f"{path} is not a readable Arrow file ({stream_error}). Give an Arrow IPC stream or file "
                         "(as datasets or pyarrow write them), or convert it to .jsonl.") from None
    return _rows(table.to_pylist(), str(path), schema_features(table.schema), table.schema)


def _read_folder(path: Path, split: str, subset: str | None, text_lines: bool = False,
                 as_text: bool = False, split_option: str = "--data-split",
                 subset_option: str = "--data-subset") -> list[Record]:
    """A ``save_to_disk`` folder (a Dataset or a DatasetDict), else a folder of data files: the split's files as
    ``datasets`` picks them (by their names, or a README's ``configs``), each read as qlora reads that file alone
    (its bad line, repeated key or odd row named by file and line, which ``datasets`` reports as "An error occurred
    while generating the dataset"), unless one is of a format qlora does not read (images, say): then the folder
    is read by ``datasets``."""
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        folder, where = path, str(path)
        try:
            if (path / "dataset_dict.json").is_file():  # a DatasetDict: the split's folder alone, as datasets reads it
                splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
                folder = path / _pick_split(dict.fromkeys(splits, split), split, str(path), split_option)
                where = f"{path}[{split}]"
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            if state.get("_data_files") == []:
                return []  # an empty Dataset, saved without data files: datasets cannot load it back (IndexError)
            for data_file in state.get("_data_files") or []:
                if isinstance(data_file, dict) and (folder / str(data_file.get("filename"))).is_file():
                    _refuse_lfs_pointer(folder / data_file["filename"])
            data = datasets.load_from_disk(str(folder))
        except UsageError:  # no such split, a Git LFS pointer
            raise
        except Exception as exc:  # FileNotFoundError, JSON and Arrow errors of a damaged folder
            raise UsageError(f"{path}: not a readable save_to_disk folder ({type(exc).__name__}: {exc}).") from None
        return _rows(data, where)
    try:
        files = {str(name): found for name, found in (datasets.load_dataset_builder(str(path), subset).config
                                                      .data_files or {}).items()}
    except ValueError as exc:  # unknown subset: datasets' message lists the existing ones
        raise _subset_error(str(path), subset, exc, subset_option, subset_option) from None
    except Exception as exc:  # no data files, a dataset script, a README whose YAML header is broken
        raise UsageError(f"{path}: a folder given as --data must be written by save_to_disk or hold data files "
                         f"that datasets reads (json, csv, parquet, arrow, text): {type(exc).__name__}: {exc}") from None
    ours = [Path(f) for f in _pick_split(files, split, str(path), split_option)]
    # a text file compressed other than by gzip, bz2, xz, zstd (lz4) is refused by _read_file, saying what to do
    if ours and all(p.is_file() and (as_text or _format_suffix(p) in LOCAL_SUFFIXES or _decompress_hint(p))
                    for p in ours):
        return [replace(r, folders=(str(p.parent),)) for p in ours for r in _read_file(p, text_lines, as_text)]
    try:
        data = datasets.load_dataset(str(path), subset, split=split)
    except Exception as exc:  # a malformed file among others (an image folder's metadata.jsonl), mixed columns
        named = ", ".join(os.path.relpath(p, path) for p in ours[:5]) + (", ..." if len(ours) > 5 else "")
        raise UsageError(f"{path}: datasets cannot read the files of its split {split!r} ({type(exc).__name__}: "
                         f"{exc}{_cause(exc)}). Fix or remove the bad file among them ({named}).") from None
    return _rows(data, f"{path}[{split}]")


def _cause(exc: BaseException) -> str:
    """The first cause of ``datasets``' wrapping error (DatasetGenerationError says only "An error occurred while
    generating the dataset")."""
    cause = exc.__cause__ or exc.__context__
    return f"; {type(cause).__name__}: {cause}" if cause is not None else ""


def _read_hub(name: str, split: str, subset: str | None, split_option: str = "--data-split",
              subset_option: str = "--data-subset") -> list[Record]:
    from qlora import hub

    near = near_local_path(name)
    if not hub.offline_mode() and not hub.hub_reachable():
        raise hub.unreachable_error(name, "dataset", f"a local data file ({', '.join(LOCAL_SUFFIXES)}) or folder",
                                    near=near)
    import datasets

    try:
        data = datasets.load_dataset(name, subset, split=split)
    except ValueError as exc:  # unknown split or subset: datasets' message lists the existing ones
        raise _subset_error(name, subset, exc, f"{split_option}, {subset_option}", subset_option) from None
    except Exception as exc:  # the hub raises many unrelated types; the user needs the message
        if hub.offline_mode():
            raise hub.unreachable_error(name, "dataset", f"a local data file ({', '.join(LOCAL_SUFFIXES)}) "
                                        "or folder", near=near) from None
        said = " ".join(str(exc).split())  # the hub's messages run over several lines
        raise UsageError(f"{name}: could not load the dataset (split {split!r}"
                         f"{f', subset {subset!r}' if subset else ''}) from the hub: {type(exc).__name__}: {said}"
                         f"{'.' if near and not said.endswith('.') else ''}{near}") from None
    return _rows(data, f"{name}[{split}]")


def _subset_error(source: str, subset: str | None, exc: ValueError, options: str,
                  subset_option: str = "--data-subset") -> UsageError:
    """``datasets``' refusal of a source's subset as one paragraph. Without a subset, of a source whose README
    defines several configurations and no default, ``datasets`` asks for one over several lines, with a Python
    ``load_dataset`` call to copy: the subsets are named here with the option that picks one (``subset_option``)."""
    import datasets

    names: list[str] = []
    if subset is None:
        try:  # with a default subset (or one alone), the error is of something else
            names = (datasets.get_dataset_config_names(source)
                     if datasets.get_dataset_default_config_name(source) is None else [])
        except Exception:  # the reason is already in hand: datasets' own message says it
            names = []
    if len(names) > 1:
        return UsageError(f"{source}: the dataset has several subsets (configurations) and no default: "
                          f"{', '.join(names)}. Choose one with {subset_option} (e.g. {subset_option} {names[0]}).")
    return UsageError(f"{source}: {' '.join(str(exc).split())} ({options})")


def _pick_split(data: Any, split: str, where: str, option: str = "--data-split") -> Any:
    if split not in data:
        raise UsageError(f"{where}: no split {split!r}; it has {', '.join(data)}. Choose one with {option}.")
    return data[split]


def _rows(rows: Iterable[dict[str, Any]], where: str, features: Any = None, schema: Any = None) -> list[Record]:
    """The rows as records; ClassLabel columns (of a ``datasets.Dataset``, or of ``features``) hold their names,
    Image columns what they store (:func:`_stored_images`), tool calls and definitions stored as structs (in the
    Dataset's or the Arrow ``schema``) no other rows' fields (:mod:`struct_nulls`). A Dataset is read as Python
    objects, every column: a ``save_to_disk`` folder keeps the format it was saved with (``set_format("torch")``:
    tensors where a label's true/false is read; ``columns=[...]``: the others hidden, a KTO ``label`` with them)."""
    labels = label_names(features if features is not None else getattr(rows, "features", None))
    if getattr(rows, "features", None):
        rows = _stored_images(rows.with_format(None))
        schema = rows.data.schema
    own = without_struct_nulls if schema is not None and has_struct_payloads(schema) else dict
    return [Record(with_label_names(own(dict(row)), labels), f"{where} row {i}") for i, row in enumerate(rows)]


def _stored_images(data: Any) -> Any:
    """A ``datasets.Dataset`` whose Image columns (an image folder's, or nested, as a list of images) read as
    they are stored, ``{"bytes", "path"}``, as qlora's own parquet reader gives them: each image is then checked
    by qlora, which names the row of a missing or unreadable file (``datasets`` decodes it as the row is read,
    raising a bare FileNotFoundError), and decoded only when its row is tokenized, not all held in memory here."""
    import dataclasses

    import datasets

    def stored(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, dict):
            return {name: stored(inner) for name, inner in feature.items()}
        if isinstance(feature, list):
            return [stored(inner) for inner in feature]
        if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):  # List, LargeList, Sequence
            return dataclasses.replace(feature, feature=stored(feature.feature))
        return feature

    features = datasets.Features({name: stored(f) for name, f in data.features.items()})
    if features == data.features:
        return data
    return data.cast(features, keep_in_memory=True)  # in memory: nothing is written into the user's folder


def _as_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        messages = isinstance(value, list) and value and all(
            isinstance(m, dict) and ({"role", "from"} & m.keys()) for m in value)
        hint = (' It is a bare list of messages: write each conversation as an object, {"messages": [...]} (jq -c '
                "'{messages: .}' on a .jsonl file, jq 'map({messages: .})' on a .json list).") if messages else ""
        raise UsageError(f"{where}: expected a JSON object with the example's fields, got {type(value).__name__}."
                         f"{hint}")
    return value
