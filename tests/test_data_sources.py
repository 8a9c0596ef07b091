"""Reading datasets from files: every format, and every bad input named by file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qlora.errors import UsageError
from qlora.train.data import demo_data_path, load_records, normalize

ALPACA = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "2+2", "output": "4"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_json_csv_read_the_same(tmp_path):
    a = load_records(_jsonl(tmp_path / "d.jsonl", ALPACA))
    (tmp_path / "d.json").write_text(json.dumps(ALPACA))
    b = load_records(tmp_path / "d.json")
    (tmp_path / "w.json").write_text(json.dumps({"data": ALPACA}))
    c = load_records(tmp_path / "w.json")
    (tmp_path / "d.csv").write_text('instruction,input,output\nSay hi,,hi\nAdd,2+2,4\n')
    d = load_records(tmp_path / "d.csv")
    assert [r.fields for r in a] == [r.fields for r in b] == [r.fields for r in c] == [r.fields for r in d]
    assert a[1].where.endswith("d.jsonl line 2") and d[1].where.endswith("d.csv line 3")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n\n" + '{"instruction": "x", "output": \n')
    with pytest.raises(UsageError, match=r"bad\.jsonl line 3: malformed JSON"):
        load_records(path)


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {oops}\n]')
    with pytest.raises(UsageError, match=r"bad\.json line 3"):
        load_records(path)


def test_a_bare_list_of_messages_is_told_to_be_wrapped(tmp_path):
    """Conversations written as bare message lists (a line or item that is [{"role": ...}, ...]) are refused with
    the object to write them as; another non-object is refused as before."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    _jsonl(tmp_path / "bare.jsonl", [turns])
    (tmp_path / "bare.json").write_text(json.dumps([turns]))
    for name, place in (("bare.jsonl", "line 1"), ("bare.json", "item 0")):
        with pytest.raises(UsageError, match=rf'{name} {place}: expected a JSON object .*got list\. It is a bare list '
                                             r'of messages: write each conversation as an object, \{"messages"'):
            load_records(tmp_path / name)
    _jsonl(tmp_path / "texts.jsonl", [["a", "b"]])
    with pytest.raises(UsageError, match=r"line 1: expected a JSON object with the example's fields, got list\.$"):
        load_records(tmp_path / "texts.jsonl")


def test_missing_field_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "no answer"}])  # "" is skipped (test_data_empty_rows)
    with pytest.raises(UsageError, match=r'd\.jsonl line 2: field "output" is missing'):
        normalize(load_records(path))


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UsageError, match=r"empty\.jsonl: the dataset is empty"):
        load_records(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(UsageError, match="unknown data format '.xml'"):
        load_records(tmp_path / "d.xml")
    with pytest.raises(UsageError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="not found"):
        load_records("./some/dir")  # a relative path, never a hub name


def test_txt_is_plain_text_by_paragraph_or_by_line(tmp_path):
    (tmp_path / "book.txt").write_text("\nFirst paragraph,\nstill first.\n\n\nSecond one.\r\n\nThird.\n\n")
    records = load_records(tmp_path / "book.txt")
    assert [r.fields for r in records] == [{"text": "First paragraph,\nstill first."}, {"text": "Second one."},
                                           {"text": "Third."}]
    assert [r.where.rsplit(" ", 2)[1:] for r in records] == [["line", "2"], ["line", "6"], ["line", "8"]]
    (tmp_path / "lines.txt").write_text("\ufeffone sample\ntwo samples\n\n")  # BOM and a trailing blank line
    records = load_records(tmp_path / "lines.txt")
    assert [r.fields["text"] for r in records] == ["one sample", "two samples"]
    examples = normalize(records)
    assert examples[1].text == "two samples" and examples[1].where.endswith("lines.txt line 2")


def test_txt_not_utf8_names_the_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes("fine\nstill fine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin\.txt line 3: not UTF-8"):
        load_records(tmp_path / "latin.txt")


def test_saved_datasets_and_arrow_files_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    one = load_records(tmp_path / "one")
    assert [r.fields for r in one] == rows and one[2].where.endswith("one row 2")
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert [r.fields for r in load_records(arrow)] == rows
    split = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                  "test": datasets.Dataset.from_list(rows[:1])})
    split.save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict")) == 3
    test = load_records(tmp_path / "dict", split="test")
    assert [r.fields for r in test] == rows[:1] and test[0].where.endswith("dict[test] row 0")
    with pytest.raises(UsageError, match=r"no split 'validation'; it has train, test"):
        load_records(tmp_path / "dict", split="validation")
    (tmp_path / "fake.arrow").write_bytes(b"not arrow")
    with pytest.raises(UsageError, match=r"fake\.arrow is not a readable Arrow file"):
        load_records(tmp_path / "fake.arrow")


def test_a_saved_empty_dataset_or_split_is_empty_not_unreadable(tmp_path):
    """datasets saves a Dataset of no rows without data files and cannot load it back (an IndexError), nor a
    DatasetDict holding such a split: its empty split is refused as empty data, and its other splits read."""
    datasets = pytest.importorskip("datasets")
    rows = [{"text": "a"}, {"text": "b"}]
    empty = datasets.Dataset.from_list(rows).select([])
    empty.save_to_disk(str(tmp_path / "empty"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": empty}).save_to_disk(str(tmp_path / "d"))
    assert [r.fields for r in load_records(tmp_path / "d")] == rows
    for folder, split in (("empty", "train"), ("d", "test")):
        with pytest.raises(UsageError, match=rf"{folder}: the dataset is empty; it needs at least one example"):
            load_records(tmp_path / folder, split=split)
    (tmp_path / "d" / "dataset_dict.json").write_text('{"splits": ')
    with pytest.raises(UsageError, match=r"d: not a readable save_to_disk folder \(JSONDecodeError"):
        load_records(tmp_path / "d")


@pytest.mark.parametrize("fmt, columns", [("torch", None), ("numpy", None), ("python", ["prompt", "completion"])])
def test_a_dataset_saved_with_a_format_reads_as_python_objects_with_every_column(tmp_path, fmt, columns):
    """save_to_disk keeps a dataset's format: read as it was set, a KTO label was a tensor or an array, or hidden
    with the columns left out, and the rows read as prompt-completion SFT data, label=false ones too."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "The sky is", "completion": " blue.", "label": True, "score": [1.0, 2.0]},
            {"prompt": "The sky is", "completion": " green.", "label": False, "score": [0.0, 1.0]}]
    datasets.Dataset.from_list(rows).with_format(fmt, columns=columns).save_to_disk(str(tmp_path / "saved"))
    records = load_records(tmp_path / "saved")
    assert [r.fields for r in records] == rows
    with pytest.raises(UsageError, match=r"saved row 0: .*--method kto"):
        normalize(records)


def test_arrow_ipc_file_format(tmp_path):
    """The random-access Arrow file (pyarrow's ipc.new_file, Feather 2, polars' write_ipc) reads as datasets'
    arrow loader reads it, not only the stream datasets itself writes."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.feather as feather

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_file(str(tmp_path / "ipc.arrow"), table.schema) as writer:
        writer.write_table(table)
    feather.write_feather(table, str(tmp_path / "feather.arrow"))
    for name in ("ipc.arrow", "feather.arrow"):
        oracle = datasets.load_dataset("arrow", data_files=str(tmp_path / name), split="train",
                                       cache_dir=str(tmp_path / "cache"))
        records = load_records(tmp_path / name)
        assert [r.fields for r in records] == oracle.to_list() == rows
        assert records[2].where.endswith(f"{name} row 2")


def test_folder_of_data_files_by_split(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "repo"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", ALPACA)
    _jsonl(folder / "test.jsonl", ALPACA[:1])
    assert [r.fields for r in load_records(folder)] == ALPACA
    assert [r.fields for r in load_records(folder, split="test")] == ALPACA[:1]
    with pytest.raises(UsageError, match=r"--data-split"):
        load_records(folder, split="dev")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"empty: a folder given as --data"):
        load_records(empty)


def test_image_paths_of_a_file_in_a_subfolder_start_beside_it_then_at_the_data_folder(tmp_path):
    """A hub-style folder's data/train.jsonl naming images/a.png finds data/images/a.png (beside the file, as when
    the file is given alone), and a path from the folder's top (data/images/a.png) is found too."""
    pytest.importorskip("datasets")
    from PIL import Image

    repo = tmp_path / "repo"
    (repo / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(repo / "data" / "images" / "a.png")
    turns = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "Black."}]
    for shown in ("images/a.png", "data/images/a.png"):
        _jsonl(repo / "data" / "train.jsonl", [{"messages": turns, "images": [shown]}])
        (ref,) = normalize(load_records(repo))[0].images
        assert (ref.shown, Path(ref.source).resolve()) == (shown, repo / "data" / "images" / "a.png")
    _jsonl(repo / "data" / "train.jsonl", [{"messages": turns, "images": ["b.png"]}])
    with pytest.raises(UsageError, match=rf"image 'b.png' not found \(looked in {repo / 'data'}, {repo}\)"):
        normalize(load_records(repo))


def test_an_image_folder_reads_its_images_as_stored_and_names_a_bad_one(tmp_path):
    """An image folder (PNGs and a metadata.jsonl) is read by datasets; its Image column is read as stored
    ({"bytes", "path"}: not every picture decoded and held), so a missing or unreadable image is named with its row
    by qlora's check (datasets raised a bare FileNotFoundError or UnidentifiedImageError), and a malformed
    metadata.jsonl is a refusal naming the folder's files, not a split or subset to choose."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "train").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (100 * i, 0, 0)).save(folder / "train" / f"{i}.png")
    meta = [{"file_name": f"{i}.png", "instruction": "Colour?", "output": ["Black.", "Red."][i]} for i in range(2)]
    _jsonl(folder / "train" / "metadata.jsonl", meta)
    before = sorted(folder.rglob("*"))
    records = load_records(folder)
    theirs = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "c"))
    assert [r.fields for r in records] == [{**row, "image": {"bytes": None, "path": row["image"].filename}}
                                           for row in theirs]
    assert [e.images[0].source for e in normalize(records)] == [str(folder.resolve() / "train" / f"{i}.png")
                                                                for i in range(2)]
    (folder / "train" / "1.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match=r"photos\[train\] row 1: image '.*1\.png' is not an image Pillow can read"):
        normalize(load_records(folder))
    (folder / "train" / "1.png").unlink()
    with pytest.raises(UsageError, match=r"photos\[train\] row 1: image '.*1\.png' not found"):
        normalize(load_records(folder))
    assert sorted(folder.rglob("*")) == [p for p in before if p.name != "1.png"]  # nothing written into the folder
    (folder / "train" / "metadata.jsonl").write_text(json.dumps(meta[0]) + "\n{bad\n")
    with pytest.raises(UsageError, match=r"photos: datasets cannot read the files of its split 'train' \(.*\)\. Fix "
                                         r"or remove the bad file among them \(train/0\.png, train/metadata\.jsonl\)"):
        load_records(folder)


def test_hub_dataset_name_offline_fails_fast_and_clearly(monkeypatch):
    """No hub (a closed local port as the endpoint): a clear error at once, not a minute of retries."""
    import time

    from qlora import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    with pytest.raises(UsageError, match=r"someone/some-dataset is not a local path, and the Hugging Face hub "
                                         r"\(https://127\.0\.0\.1:\d+\) is not reachable"):
        load_records("someone/some-dataset", split="train", subset="en")
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 1


def test_hub_dataset_name_in_offline_mode_says_so(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"not in the Hugging Face cache, and offline mode is on"):
        load_records("someone/some-dataset-that-is-not-cached")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_dataset_is_shipped_alpaca():
    examples = normalize(load_records(demo_data_path()))
    assert 40 <= len(examples) <= 80
    assert all(e.messages[-1]["role"] == "assistant" for e in examples)


def test_parquet_round_trip_and_corrupt_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add 1+1", "input": "", "output": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records = load_records(tmp_path / "d.parquet")
    assert [r.fields for r in records] == rows and records[1].where.endswith("row 1")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UsageError, match="bad.parquet is not a readable parquet file"):
        load_records(tmp_path / "bad.parquet")


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Windows editors and Excel start UTF-8 files with a BOM; every text format reads past it."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "d.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in ALPACA).encode())
    (tmp_path / "d.json").write_bytes(bom + json.dumps(ALPACA).encode())
    (tmp_path / "d.csv").write_bytes(bom + b"instruction,input,output\nSay hi,,hi\nAdd,2+2,4\n")
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert [r.fields for r in load_records(tmp_path / name)] == ALPACA, name


@pytest.mark.parametrize("compression", ["", ".gz", ".bz2", ".xz", ".zst"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "tsv"])
def test_tab_separated_and_compressed_text_files_read_as_their_plain_twin(tmp_path, kind, compression):
    import bz2
    import gzip
    import lzma

    zstd_open = pytest.importorskip("zstandard").open if compression == ".zst" else None
    text = {"jsonl": "".join(json.dumps(r) + "\n" for r in ALPACA), "json": json.dumps(ALPACA),
            "csv": "instruction,input,output\nSay hi,,hi\nAdd,2+2,4\n",
            "tsv": "instruction\tinput\toutput\nSay hi\t\thi\nAdd\t2+2\t4\n"}[kind]
    path = tmp_path / f"d.{kind}{compression}"
    opener = {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": zstd_open}[compression]
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(text)
    records = load_records(path)
    assert [r.fields for r in records] == ALPACA
    assert records[-1].where.startswith(f"{path} ")  # errors still name the file and its line or item


def test_a_damaged_compressed_file_is_named_and_bad_text_inside_it_has_its_line(tmp_path):
    import gzip

    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:40])
    with pytest.raises(UsageError, match="cut.jsonl.gz: cannot be decompressed"):
        load_records(tmp_path / "cut.jsonl.gz")
    (tmp_path / "latin.jsonl.gz").write_bytes(gzip.compress('{"text": "a"}\n{"text": "caf\xe9"}\n'.encode("latin1")))
    with pytest.raises(UsageError, match="latin.jsonl.gz line 2: not UTF-8"):
        load_records(tmp_path / "latin.jsonl.gz")


def test_csv_rows_wider_than_the_header_and_repeated_columns_are_refused_not_cut(tmp_path):
    """An unquoted comma splits a text into cells past the header's columns, and a repeated column name hides a
    cell: either would train a wrong answer without a word, so the line is named. A short row's missing cells are
    null, and a trailing separator (an empty extra cell) loses nothing."""
    (tmp_path / "wide.csv").write_text('instruction,output\n"a, b",c\ne,[1,2]\n')
    with pytest.raises(UsageError, match=r"wide\.csv line 3: 3 cells, but the header has 2 columns"):
        load_records(tmp_path / "wide.csv")
    (tmp_path / "twice.tsv").write_text("instruction\toutput\toutput\na\tb\tc\n")
    with pytest.raises(UsageError, match=r"twice\.tsv line 1: the header names the column 'output' more than once"):
        load_records(tmp_path / "twice.tsv")
    (tmp_path / "loose.csv").write_text('instruction,input,output\n"x\ny",,z,\n\nq,r\n')
    records = load_records(tmp_path / "loose.csv")
    assert [r.fields for r in records] == [{"instruction": "x\ny", "input": "", "output": "z"},
                                           {"instruction": "q", "input": "r", "output": None}]
    assert [r.where.rsplit(" ", 1)[-1] for r in records] == ["2", "5"]  # a row spanning lines: where it starts


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.txt"])
def test_utf16_files_and_nul_bytes_are_named_as_such(tmp_path, name):
    """A UTF-16 file (PowerShell's redirection, Excel's "Unicode text") is not latin-1: the advice names the
    encoding its byte-order mark gives. Without the mark, or in a file with a crash's zeros, NUL bytes name the
    line instead of passing as text or as a misleading JSON error."""
    text = {"d.jsonl": json.dumps(ALPACA[0]) + "\n", "d.csv": "instruction,output\na,b\n", "d.txt": "hello\n"}[name]
    (tmp_path / name).write_bytes(text.encode("utf-16"))
    with pytest.raises(UsageError, match=r"line 1: not UTF-8 text .*UTF-16 text: save it as UTF-8 \(e\.g\. iconv -f "
                                         r"utf-16 -t utf-8\)"):
        load_records(tmp_path / name)
    (tmp_path / name).write_bytes(text.encode() + b"\x00" * 8 + b"\n")
    with pytest.raises(UsageError, match=rf"{name} line {text.count(chr(10)) + 1}: holds NUL bytes"):
        load_records(tmp_path / name)


def _class_label_data(datasets):
    """(features, dataset, rows as read): a ClassLabel column (-1 is no label) and a list of ClassLabels, held as
    ints, read back as their names."""
    features = datasets.Features({"instruction": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"]),
                                  "tags": datasets.Sequence(datasets.ClassLabel(names=["a", "b", "c"]))})
    data = datasets.Dataset.from_dict({"instruction": ["q0", "q1", "q2"], "label": [1, 0, -1],
                                       "tags": [[2, 0], [], [1]]}, features=features)
    expected = [{"instruction": "q0", "label": "yes", "tags": ["c", "a"]},
                {"instruction": "q1", "label": "no", "tags": []},
                {"instruction": "q2", "label": None, "tags": ["b"]}]
    return features, data, expected


def test_class_label_columns_read_as_their_names(tmp_path):
    """A ClassLabel column keeps its names only in the features: an answer mapped to it trains the name ("yes"),
    not the index; -1 (no label) is null, so such a row is an empty answer; a list of labels names each."""
    datasets = pytest.importorskip("datasets")
    _, data, expected = _class_label_data(datasets)
    data.save_to_disk(str(tmp_path / "saved"))
    assert [r.fields for r in load_records(tmp_path / "saved")] == expected
    assert [r.fields for r in load_records(next((tmp_path / "saved").glob("*.arrow")))] == expected
    examples = normalize(load_records(tmp_path / "saved"), fields="output=label")
    assert [e.messages[-1]["content"] for e in examples] == ["yes", "no", ""]
    assert [e.skip for e in examples] == [None, None, "an empty answer"]


def test_a_key_named_twice_in_a_json_object_is_refused_at_its_line(tmp_path):
    """Python's json keeps the last of two values under one key without a word (datasets refuses such a JSON Lines
    row): a producer's bug that would train half a row. The line is the object's, in JSON Lines and in a
    pretty-printed .json alike, nested objects (a message) included; one key in several objects is no repeat."""
    fine = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    dup_jsonl = tmp_path / "dup.jsonl"
    dup_jsonl.write_text(json.dumps(fine) + "\n" + '{"text": "a", "text": "b"}\n')
    with pytest.raises(UsageError, match=r"dup\.jsonl line 2: a JSON object names the key 'text' twice"):
        load_records(dup_jsonl)
    nested = json.dumps({"data": [ALPACA[0], fine]}, indent=2).replace('"content": "Hello"',
                                                                      '"content": "Hello", "content": "Bye"')
    (tmp_path / "dup.json").write_text(nested)
    line = nested.splitlines().index(next(s for s in nested.splitlines() if '"Bye"' in s)) - 1  # the object's "{"
    assert nested.splitlines()[line - 1].strip() == "{"
    with pytest.raises(UsageError, match=rf"dup\.json line {line}: a JSON object names the key 'content' twice"):
        load_records(tmp_path / "dup.json")
    (tmp_path / "lines.json").write_text(json.dumps(fine) + '\n{"output": "a", "instruction": "q", "output": "b"}\n')
    with pytest.raises(UsageError, match=r"lines\.json line 2: a JSON object names the key 'output' twice"):
        load_records(tmp_path / "lines.json")  # JSON Lines named .json
    assert [r.fields for r in load_records(_jsonl(tmp_path / "fine.jsonl", [fine, fine]))] == [fine, fine]


def test_a_semicolon_separated_csv_reads_as_its_comma_twin(tmp_path, capsys):
    """Excel in most European locales saves CSV with ';' (a comma is their decimal mark), quoting only cells that
    hold a ';': read with ',' it would be one column named 'instruction;input;output', and a comma in a text
    would split it. The separator is found from the header, among , ; tab |, and said on stderr."""
    (tmp_path / "excel.csv").write_text('instruction;input;output\nSay hi;;hi\nAdd;2+2;4\n"a; b";1,5;"x\ny"\n',
                                        encoding="utf-8")
    records = load_records(tmp_path / "excel.csv")
    assert [r.fields for r in records] == ALPACA + [{"instruction": "a; b", "input": "1,5", "output": "x\ny"}]
    assert records[-1].where.endswith("excel.csv line 4") and "';' between cells" in capsys.readouterr().err
    (tmp_path / "commas.tsv").write_text("instruction,input,output\nSay hi,,hi\nAdd,2+2,4\n")
    assert [r.fields for r in load_records(tmp_path / "commas.tsv")] == ALPACA
    (tmp_path / "one.csv").write_text("text\nsee you; soon\nyes|no\n")  # one column: its texts may hold anything
    assert [r.fields for r in load_records(tmp_path / "one.csv")] == [{"text": "see you; soon"}, {"text": "yes|no"}]
    (tmp_path / "both.csv").write_text("a;b|c\n1;2|3\n")
    with pytest.raises(UsageError, match=r"both\.csv line 1: the header is one column .* splits at each of ';', '\|'"):
        load_records(tmp_path / "both.csv")
    (tmp_path / "wide.csv").write_text("instruction;output\na;b;c\n")  # the found separator's rows are checked too
    with pytest.raises(UsageError, match=r"wide\.csv line 2: 3 cells, but the header has 2 columns.*\(';'\)"):
        load_records(tmp_path / "wide.csv")


def test_a_json_file_holding_one_object(tmp_path):
    """One object is one row, as datasets' json loader reads it; an object whose every field is a list of the
    same length (the rows under one field, which datasets reads only given field=; columns, as Dataset.to_dict()
    writes them; or one example of list fields) is refused, naming the fields and each way to write it."""
    datasets = pytest.importorskip("datasets")
    rows = [{"text": "hello", "label": 3}, {"messages": [{"role": "user", "content": "Hi"}], "tools": []}]
    for i, row in enumerate(rows):
        path = tmp_path / f"one{i}.json"
        path.write_text("\n" + json.dumps(row, indent=2))
        ours = load_records(path)
        theirs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
        assert [r.fields for r in ours] == theirs.to_list() == [row] and ours[0].where.endswith(f"one{i}.json line 2")
    (tmp_path / "rows.json").write_text(json.dumps({"rows": ALPACA}))
    with pytest.raises(UsageError, match=r"rows\.json: one JSON object whose only field, 'rows', holds a list of 2: "
                                         r"the rows under 'rows', or one example .*jq '\.rows' rows\.json .*\"data\".*"
                                         r"put the object in a list"):
        load_records(tmp_path / "rows.json")
    (tmp_path / "texts.json").write_text(json.dumps({"text": ["a", "b", "c"], "label": [0, 1, 0]}))
    with pytest.raises(UsageError, match=r"texts\.json: one JSON object whose fields 'text', 'label' each hold a list "
                                         r"of 3: columns \(as Dataset\.to_dict\(\) writes them\), or one example .*put "
                                         r"the object in a list"):
        load_records(tmp_path / "texts.json")
    (tmp_path / "lines.json").write_text(json.dumps({"text": ["a", "b"]}))
    with pytest.raises(UsageError, match=r"only field, 'text', holds a list of 2: columns .*put the object in a list"):
        load_records(tmp_path / "lines.json")
    (tmp_path / "data.json").write_text(json.dumps({"version": "1.0", "data": ALPACA}))  # as datasets' field="data"
    theirs = datasets.load_dataset("json", data_files=str(tmp_path / "data.json"), field="data", split="train",
                                   cache_dir=str(tmp_path / "c"))
    assert [r.fields for r in load_records(tmp_path / "data.json")] == theirs.to_list() == ALPACA


def test_class_label_names_in_a_parquet_file_written_by_datasets(tmp_path):
    """Dataset.to_parquet keeps the features in the schema's metadata (key huggingface): a ClassLabel column is
    ints, its names only there; read as datasets reads the file, the rows hold the names (so do an Arrow IPC file's
    with that schema). A file from other tools, with no such metadata, keeps its ints."""
    datasets = pytest.importorskip("datasets")
    features, data, expected = _class_label_data(datasets)
    data.to_parquet(str(tmp_path / "d.parquet"))
    assert [r.fields for r in load_records(tmp_path / "d.parquet")] == expected
    theirs = datasets.load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train",
                                   cache_dir=str(tmp_path / "c"))
    assert theirs.features == features
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pa.ipc.new_file(tmp_path / "d.arrow", data.data.table.schema) as writer:  # the same table as an IPC file
        writer.write_table(data.data.table)
    assert [r.fields for r in load_records(tmp_path / "d.arrow")] == expected
    pq.write_table(data.data.table.replace_schema_metadata(None), tmp_path / "plain.parquet")
    assert [r.fields["label"] for r in load_records(tmp_path / "plain.parquet")] == [1, 0, -1]


def test_a_json_list_of_strings_is_plain_text_rows(tmp_path):
    """datasets' json loader reads a top-level list of strings as a "text" column: each string is one plain-text
    row, trained as a text row of a .jsonl would be (so is a list under "data"). A list mixing strings with
    objects (datasets reads it as one untyped column) is refused at its first odd item."""
    datasets = pytest.importorskip("datasets")
    texts = ["Once upon a time", "", "The end."]
    (tmp_path / "texts.json").write_text(json.dumps(texts, indent=2))
    theirs = datasets.load_dataset("json", data_files=str(tmp_path / "texts.json"), split="train",
                                   cache_dir=str(tmp_path / "c"))
    records = load_records(tmp_path / "texts.json")
    assert [r.fields for r in records] == theirs.to_list() == [{"text": t} for t in texts]
    assert records[2].where.endswith("texts.json item 2")
    twin = load_records(_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts]))
    assert [(e.text, e.messages) for e in normalize(records)] == [(e.text, e.messages) for e in normalize(twin)]
    (tmp_path / "data.json").write_text(json.dumps({"data": texts}))
    assert [r.fields for r in load_records(tmp_path / "data.json")] == [{"text": t} for t in texts]
    (tmp_path / "mixed.json").write_text(json.dumps(["a", "b", {"text": "c"}]))
    with pytest.raises(UsageError, match=r"mixed\.json item 2: not a string, unlike item 0\. A \.json list holds "
                                         r"rows \(objects\) or plain texts"):
        load_records(tmp_path / "mixed.json")
    (tmp_path / "mixed2.json").write_text(json.dumps([{"text": "c"}, "a"]))
    with pytest.raises(UsageError, match=r"mixed2\.json item 1: a string, unlike item 0"):
        load_records(tmp_path / "mixed2.json")


def test_a_semicolon_csv_whose_header_names_hold_commas(tmp_path, capsys):
    """A ';' file whose header names hold a comma splits into several names at ',' too; its rows line up under the
    header at ';' only, so ';' is read (as pandas' sep=None sniffing does). A comma file whose quoted texts hold
    ';' lines up at ',' and keeps it, and so does one whose header names hold ';'."""
    pd = pytest.importorskip("pandas")
    text = 'instruction;"input, if any";output, short\nSay hi;;hi\nAdd;2+2;4\n"a; b";1,5;x\n'
    (tmp_path / "excel.csv").write_text(text)
    records = load_records(tmp_path / "excel.csv")
    oracle = pd.read_csv(tmp_path / "excel.csv", sep=";", keep_default_na=False, dtype=str)
    assert [r.fields for r in records] == oracle.to_dict("records")
    assert records[2].fields == {"instruction": "a; b", "input, if any": "1,5", "output, short": "x"}
    assert "';' between cells" in capsys.readouterr().err
    (tmp_path / "commas.csv").write_text('instruction,input,output\n"a; b",;,"x;y"\nSay hi,,hi\n')
    assert [r.fields for r in load_records(tmp_path / "commas.csv")] == [
        {"instruction": "a; b", "input": ";", "output": "x;y"}, {"instruction": "Say hi", "input": "", "output": "hi"}]
    (tmp_path / "names.csv").write_text('text;plain,label\nhello,1\n"x;y",0\n')
    assert [r.fields for r in load_records(tmp_path / "names.csv")] == [{"text;plain": "hello", "label": "1"},
                                                                        {"text;plain": "x;y", "label": "0"}]
    assert "between cells" not in capsys.readouterr().err


def test_a_folder_of_data_files_reads_each_file_as_qlora_reads_it_alone(tmp_path):
    """A folder's files for the split are the ones datasets picks (its order too), each read as qlora reads that
    file given alone: a bad line, a key named twice or a row of another format is named by file and line (datasets
    says only "An error occurred while generating the dataset"), and a ';' CSV is read at ';'."""
    datasets = pytest.importorskip("datasets")
    good = tmp_path / "good"
    (good / "more").mkdir(parents=True)
    _jsonl(good / "train-0.jsonl", ALPACA[:1])
    _jsonl(good / "more" / "train-1.jsonl", ALPACA[1:])
    _jsonl(good / "test.jsonl", ALPACA[:1])
    for split in ("train", "test"):
        theirs = datasets.load_dataset(str(good), split=split, cache_dir=str(tmp_path / "c"))
        records = load_records(good, split=split)
        assert [r.fields for r in records] == theirs.to_list()
    assert load_records(good)[0].where.endswith("more/train-1.jsonl line 1")
    for name, second, match in [
            ("bad", '{"text": "c"}\n{"text": \n', r"bad/b\.jsonl line 2: malformed JSON"),
            ("dup", '{"text": "c"}\n{"text": "d", "text": "e"}\n', r"dup/b\.jsonl line 2: .* names the key 'text' twice")]:
        (tmp_path / name).mkdir()
        _jsonl(tmp_path / name / "a.jsonl", [{"text": "a"}])
        (tmp_path / name / "b.jsonl").write_text(second)
        with pytest.raises(UsageError, match=match):
            load_records(tmp_path / name)
        with pytest.raises(UsageError, match=rf"{name}: no split 'test'; it has train\. Choose one with --data-split"):
            load_records(tmp_path / name, split="test")  # eval's default split: named, not the file's error
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _jsonl(mixed / "a.jsonl", [{"text": "a"}, {"text": "b"}])
    _jsonl(mixed / "b.jsonl", ALPACA[:1])
    with pytest.raises(UsageError, match=r"mixed/b\.jsonl line 1: field \"text\" is missing .* looks like the alpaca"):
        normalize(load_records(mixed))
    excel = tmp_path / "excel"
    excel.mkdir()
    (excel / "a.csv").write_text("instruction;input;output\nSay hi;;hi\nAdd;2+2;4\n")
    assert [r.fields for r in load_records(excel)] == ALPACA


def test_line_ends_a_last_line_without_newline_and_zstd_alone_or_in_a_folder(tmp_path):
    """Windows line ends (CRLF, a quoted CSV newline kept as written), a BOM and a last line without a newline
    read as datasets reads them, in a file alone or in a folder; so does a zstd-compressed text file (hub corpora
    ship .jsonl.zst shards), alone or in a folder, and a cut one is named as such."""
    datasets = pytest.importorskip("datasets")
    zstandard = pytest.importorskip("zstandard")
    folder = tmp_path / "crlf"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\r\n{"text": "b"}')
    (folder / "b.jsonl").write_bytes(b'{"text": "c"}\r\n')
    (tmp_path / "d.csv").write_bytes(b'instruction,input,output\r\n"two\r\nlines",,x\r\nAdd,2+2,4')
    zstd = tmp_path / "z"
    zstd.mkdir()
    (zstd / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    for path in (folder / "a.jsonl", folder, tmp_path / "d.csv", zstd / "d.jsonl.zst", zstd):
        kind = {".jsonl": "json", ".csv": "csv", ".zst": "json"}.get(path.suffix)
        theirs = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(tmp_path / "c")) \
            if kind else datasets.load_dataset(str(path), split="train", cache_dir=str(tmp_path / "c"))
        assert [r.fields for r in load_records(path)] == [
            {k: v if v is not None else "" for k, v in row.items()} for row in theirs.to_list()], path
    good = (zstd / "d.jsonl.zst").read_bytes()
    cut, overwritten = good[:20], good[:6] + b"\xff" * (len(good) - 6)
    for damaged, error in ((cut, "EOFError"), (overwritten, "ZstdError")):
        (zstd / "d.jsonl.zst").write_bytes(damaged)
        for path in (zstd / "d.jsonl.zst", zstd):
            with pytest.raises(UsageError, match=rf"z/d\.jsonl\.zst: cannot be decompressed \({error}"):
                load_records(path)
    lz4 = tmp_path / "d.jsonl.lz4"
    lz4.write_bytes(b"\x04\x22\x4d\x18")  # lz4's magic number: still refused, saying what to do
    with pytest.raises(UsageError, match=r"unknown data format '\.jsonl\.lz4'.* It looks compressed \(\.lz4\): "
                                         r"decompress it first, e\.g\. to d\.jsonl"):
        load_records(lz4)


def test_zstd_without_the_zstandard_package_says_what_to_install(tmp_path, monkeypatch):
    """zstandard is optional (datasets needs it for .zst as well): without it the file is named with both ways out."""
    (tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # what `import zstandard` meets where it is not installed
    with pytest.raises(UsageError, match=r"d\.jsonl\.zst is zstd-compressed: reading it needs the zstandard package "
                                         r"\(pip install zstandard, as datasets needs it\), or decompress it first "
                                         r"\(zstd -d d\.jsonl\.zst\)"):
        load_records(tmp_path / "d.jsonl.zst")


@pytest.mark.parametrize("compression", ["gzip", "bz2", "lzma", "zstandard"])
def test_a_compressed_file_whose_name_does_not_say_so_reads_as_datasets_reads_it(tmp_path, compression):
    """A gzip, bzip2, xz or zstd file saved as data.jsonl (a download that kept its Content-Encoding) is read by
    its first bytes, as datasets reads it, its lines named as in the plain file; a damaged one is named as such,
    not as text in another encoding. Plain text starting like bzip2's "BZh" stays text."""
    import bz2
    import gzip
    import lzma

    datasets = pytest.importorskip("datasets")
    module = {"gzip": gzip, "bz2": bz2, "lzma": lzma}.get(compression) or pytest.importorskip(compression)
    compress = module.ZstdCompressor().compress if compression == "zstandard" else module.compress
    path = tmp_path / "d.jsonl"
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    theirs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    records = load_records(path)
    assert [r.fields for r in records] == theirs.to_list() == ALPACA and records[1].where.endswith("d.jsonl line 2")
    (tmp_path / "t.txt").write_bytes(compress(b"one\ntwo\n"))
    assert [r.fields for r in load_records(tmp_path / "t.txt")] == [{"text": "one"}, {"text": "two"}]
    (tmp_path / "bzh.txt").write_text("BZh91AY is how bzip2 starts\n")
    assert [r.fields["text"] for r in load_records(tmp_path / "bzh.txt")] == ["BZh91AY is how bzip2 starts"]
    (tmp_path / "cut.csv").write_bytes(compress(b"instruction,output\n" + b"a,b\n" * 200)[:-9])
    with pytest.raises(UsageError, match=r"cut\.csv: cannot be decompressed"):
        load_records(tmp_path / "cut.csv")


def test_nan_in_json_data_is_a_missing_value_as_datasets_reads_it(tmp_path):
    """Python's json.dumps writes a pandas gap as NaN (not JSON): such a value is read as null, as datasets reads it
    in a column that also holds text, so a NaN system prompt is none and a NaN answer an empty one (skipped), not a
    number refused or trained."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "a", "completion": float("nan")}, {"prompt": "b", "completion": "c"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    records = load_records(path)
    assert [r.fields for r in records] == theirs.to_list() == [{"prompt": "a", "completion": None},
                                                               {"prompt": "b", "completion": "c"}]
    assert [e.skip for e in normalize(records)] == ["an empty answer", None]
    (tmp_path / "a.json").write_text(json.dumps([{"system": float("nan"), "instruction": "Add", "input": float("nan"),
                                                  "output": "4"}]))
    (example,) = normalize(load_records(tmp_path / "a.json"))
    assert example.messages == ({"role": "user", "content": "Add"}, {"role": "assistant", "content": "4"})


def test_a_glob_pattern_reads_its_files_in_order_as_datasets_reads_data_files(tmp_path):
    """--data 'shards/*.jsonl' (a sharded corpus, as datasets' data_files takes it) reads every matching file, sorted,
    each line named by its file; ** reaches subfolders; a pattern matching nothing is refused as such. The run's
    fingerprints cover the matched files (a resume sees one changed), and a split asked of them is refused, as of
    files named one by one."""
    from qlora.train.data.selection import check_split_of_files
    from qlora.train.file_fingerprint import data_fingerprints

    datasets = pytest.importorskip("datasets")
    shards = tmp_path / "shards"
    (shards / "more").mkdir(parents=True)
    for i in (2, 0, 10, 1):
        _jsonl(shards / f"part-{i}.jsonl", [{"text": f"doc {i}"}, {"text": f"doc {i} again"}])
    _jsonl(shards / "more" / "part-9.jsonl", [{"text": "deeper"}])
    (shards / "notes.txt").write_text("not data\n")
    pattern = str(shards / "part-*.jsonl")
    theirs = datasets.load_dataset("json", data_files=pattern, split="train", cache_dir=str(tmp_path / "c"))
    records = load_records(pattern)
    assert [r.fields for r in records] == theirs.to_list()
    assert [r.where.split("/")[-1] for r in records[:3]] == ["part-0.jsonl line 1", "part-0.jsonl line 2",
                                                             "part-1.jsonl line 1"]
    assert [r.fields["text"] for r in load_records(str(shards / "**" / "*.jsonl"))][0] == "deeper"  # more/ < part-
    assert sorted(Path(p).name for p in data_fingerprints(pattern)) == [f"part-{i}.jsonl" for i in (0, 1, 10, 2)]
    with pytest.raises(UsageError, match=r"--data-split test: .*part-\*\.jsonl is a data file"):
        check_split_of_files(pattern, "test", None, "data", ("--data-split", "--data-subset"), "train")
    with pytest.raises(UsageError, match=r"shards/\*\.parquet: no such file, and no file matches it as a glob pattern"):
        load_records(str(shards / "*.parquet"))


def test_json_objects_written_over_several_lines_read_as_datasets_reads_them(tmp_path):
    """jq's output without -c (or json.dump(row, f, indent=2) per row) and a JSON array of rows (over several lines or
    on one), saved as .jsonl (or objects one after another as .json), are read as datasets' json loader reads them,
    each row named by the line where its object starts; an object broken in such a file is named by the line where
    it breaks and where it starts; a key named twice there too."""
    datasets = pytest.importorskip("datasets")
    pretty = "".join(json.dumps(r, indent=2) + "\n" for r in ALPACA)
    (tmp_path / "jq.jsonl").write_text(pretty)
    (tmp_path / "jq.json").write_text(pretty)
    (tmp_path / "array.jsonl").write_text(json.dumps(ALPACA, indent=2))
    (tmp_path / "line.jsonl").write_text(json.dumps(ALPACA) + "\n")
    for name, where in (("jq.jsonl", "line 6"), ("jq.json", "line 6"), ("array.jsonl", "item 1"),
                        ("line.jsonl", "item 1")):
        path = tmp_path / name
        theirs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
        records = load_records(path)
        assert [r.fields for r in records] == theirs.to_list() == ALPACA, name
        assert records[1].where == f"{path} {where}"
    (tmp_path / "bad.jsonl").write_text(pretty + '{\n  "instruction": "x"\n  "output": "y"\n}\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl line 13: malformed JSON \(Expecting ',' delimiter at column 3\), "
                                         r"in the value starting at line 11\.$"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "twice.jsonl").write_text(pretty + '{\n  "text": "x",\n  "text": "y"\n}\n')
    with pytest.raises(UsageError, match=r"twice\.jsonl line 11: a JSON object names the key 'text' twice"):
        load_records(tmp_path / "twice.jsonl")


def test_a_cut_off_last_line_and_a_raw_line_break_in_a_string_say_so(tmp_path):
    """A .jsonl file whose last line ends inside its object (an interrupted download or write) is named as cut off,
    and a string holding a raw line break (a file written by hand) is told to escape it; the decoder's message
    keeps no dangling "at"."""
    rows = "".join(json.dumps(r) + "\n" for r in ALPACA)
    (tmp_path / "cut.jsonl").write_text(rows + json.dumps(ALPACA[0])[:20])
    with pytest.raises(UsageError, match=r"cut\.jsonl line 3: malformed JSON \(Unterminated string starting at column "
                                         r"17\)\. The file ends inside this line: it looks cut off"):
        load_records(tmp_path / "cut.jsonl")
    (tmp_path / "raw.jsonl").write_text(rows + '{"text": "one\ntwo"}\n')
    with pytest.raises(UsageError, match=r"raw\.jsonl line 3: malformed JSON \(Invalid control character at column "
                                         r"14\)\. A string holds a raw line break"):
        load_records(tmp_path / "raw.jsonl")


def test_half_of_a_surrogate_pair_is_refused_at_its_line_and_column(tmp_path):
    """A JSON string holding half of a UTF-16 surrogate pair (an emoji that a cut at a fixed length split, written
    "\\ud83d" by an ASCII-escaping JSON writer) is no text: the tokenizer raised a bare TypeError on it, and datasets
    refuses the file. It is named by file, line and column; a whole pair, and a backslash written as text, read."""
    datasets = pytest.importorskip("datasets")
    whole = '{"text": "ok \\ud83d\\ude00 pair"}\n{"text": "literal \\\\ud83d is text"}\n'
    (tmp_path / "whole.jsonl").write_text(whole)
    assert [r.fields["text"] for r in load_records(tmp_path / "whole.jsonl")] == ["ok \U0001F600 pair",
                                                                                 "literal \\ud83d is text"]
    (tmp_path / "cut.jsonl").write_text(whole + '{"text": "\\ud83d\\ude00 broken emoji \\ud83d"}\n')
    with pytest.raises(Exception):
        datasets.load_dataset("json", data_files=str(tmp_path / "cut.jsonl"), split="train",
                              cache_dir=str(tmp_path / "c"))
    with pytest.raises(UsageError, match=r"cut\.jsonl line 3: a string holds half of a UTF-16 surrogate pair "
                                         r"\(\\ud83d at column 37\)"):
        load_records(tmp_path / "cut.jsonl")
    (tmp_path / "cut.json").write_text('[{"messages": [{"role": "user", "content": "hi"},\n'
                                       '  {"role": "assistant", "content": "\\udc00"}]}]')
    with pytest.raises(UsageError, match=r"cut\.json line 2: a string holds half of a UTF-16 surrogate pair "
                                         r"\(\\udc00 at column 37\)"):
        load_records(tmp_path / "cut.json")


def test_ndjson_files_are_json_lines_as_datasets_reads_them(tmp_path):
    """.ndjson (newline-delimited JSON, as BigQuery and jq pipelines name it) is JSON Lines to datasets: read so,
    alone, gzip-compressed and in a folder, each row named by its line."""
    import gzip

    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "repo"
    folder.mkdir()
    path = _jsonl(folder / "train.ndjson", ALPACA)
    (tmp_path / "d.ndjson.gz").write_bytes(gzip.compress(path.read_bytes()))
    theirs = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    for source in (path, tmp_path / "d.ndjson.gz", folder):
        records = load_records(source)
        assert [r.fields for r in records] == theirs.to_list() == ALPACA, source
        assert records[1].where.endswith("ndjson line 2") or records[1].where.endswith("ndjson.gz line 2")


def test_a_windows_encoded_csv_is_told_to_convert_from_cp1252_not_latin1(tmp_path):
    """Excel on Windows saves CSV in cp1252: its curly quotes and dashes (bytes 0x80-0x9F) would become control
    characters under the latin1 conversion the message suggested; it names cp1252 for such a file, latin1 where no
    such byte is."""
    text = "instruction,output\nSay \u201chi\u201d,It\u2019s fine \u2014 really\n"
    (tmp_path / "excel.csv").write_bytes(text.encode("cp1252"))
    with pytest.raises(UsageError, match=r"excel\.csv line 2: not UTF-8 text .* iconv -f cp1252 -t utf-8") as error:
        load_records(tmp_path / "excel.csv")
    assert "latin1" not in str(error.value) and text.encode("cp1252").decode("latin1") != text
    (tmp_path / "latin.csv").write_bytes("instruction,output\ncaf\u00e9,ok\n".encode("latin1"))
    with pytest.raises(UsageError, match=r"latin\.csv line 2: not UTF-8 text .* iconv -f latin1 -t utf-8"):
        load_records(tmp_path / "latin.csv")


def test_git_lfs_pointers_are_named_as_such(tmp_path):
    """A dataset repository cloned without git-lfs holds pointers in place of its files: each is named as a pointer
    and told how to fetch the data, alone, in a folder of data files and in a save_to_disk folder (it was a
    malformed first line, or a parquet file "corrupted")."""
    datasets = pytest.importorskip("datasets")
    pointer = ("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258d"
               "aaa5e2ca24d17e2393\nsize 12345\n")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.parquet").write_text(pointer)
    (tmp_path / "d.jsonl").write_text(pointer)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(saved))
    arrow = next(saved.glob("*.arrow"))
    arrow.write_text(pointer)
    for source, name in ((tmp_path / "d.jsonl", "d.jsonl"), (repo, "train-00000-of-00001.parquet"),
                         (saved, arrow.name)):
        with pytest.raises(UsageError, match=rf"{name} is a Git LFS pointer, not the data: .* git lfs pull"):
            load_records(source)


def test_tool_calls_stored_as_arrow_structs_keep_their_own_arguments(tmp_path):
    """Rows whose tool calls take different arguments, written to Parquet or Arrow (datasets, pandas and pyarrow
    unify the structs: each call gets every argument seen, the others null), read as the same JSON Lines rows: the
    model is not taught to pass other tools' arguments as null, nor shown other tools' parameters; a null written
    in a JSON file stays."""
    datasets = pytest.importorskip("datasets")

    def tool(name, props):
        return {"type": "function", "function": {"name": name, "description": f"{name} it",
                                                 "parameters": {"type": "object", "properties": props}}}

    def row(name, args, props):
        return {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": None,
                              "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]},
                             {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}],
                "tools": [tool(name, props)]}

    rows = [row("weather", {"city": "Paris"}, {"city": {"type": "string"}}),
            row("search", {"query": "cats", "limit": 3}, {"query": {"type": "string"}, "limit": {"type": "integer"}})]
    data = datasets.Dataset.from_list(rows)
    assert data[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "query": None,
                                                                                 "limit": None}
    data.to_parquet(str(tmp_path / "d.parquet"))
    data.save_to_disk(str(tmp_path / "saved"))
    wanted = normalize(load_records(_jsonl(tmp_path / "d.jsonl", rows)))
    for source in (tmp_path / "d.parquet", tmp_path / "saved", next((tmp_path / "saved").glob("*.arrow"))):
        examples = normalize(load_records(source))
        assert [(e.messages, e.tools) for e in examples] == [(e.messages, e.tools) for e in wanted], source
    meant = [row("weather", {"city": "Paris", "units": None}, {"city": {"type": "string"}})]
    (example,) = normalize(load_records(_jsonl(tmp_path / "null.jsonl", meant)))
    assert example.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "units": None}


def test_a_tool_call_without_arguments_in_a_struct_column_is_a_call_with_none(tmp_path):
    """A call written without "arguments" beside calls that have them is a null struct in Parquet, read as a call
    taking none ({}), as its JSON twin without the field; it was refused as arguments that are not an object."""
    datasets = pytest.importorskip("datasets")

    def row(function):
        return {"messages": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                                                                                    "function": function}]},
                             {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}]}

    rows = [row({"name": "weather", "arguments": {"city": "Paris"}}), row({"name": "now"})]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_records(tmp_path / "d.parquet")[1].fields["messages"][1]["tool_calls"][0]["function"] == {
        "name": "now", "arguments": None}
    for source in (tmp_path / "d.parquet", _jsonl(tmp_path / "d.jsonl", rows)):
        calls = [e.messages[1]["tool_calls"][0]["function"] for e in normalize(load_records(source))]
        assert calls == [{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]


@pytest.mark.parametrize("orient", ["columns", "index", "split"])
def test_a_dataframe_written_by_pandas_to_json_reads_as_its_rows(tmp_path, orient):
    """DataFrame.to_json writes {column: {"0": value, ...}} by default (orient="columns"), or rows under their
    labels ("index"), or {"columns", "index", "data"} ("split"): read as the rows pandas.read_json reads back (they
    were one row whose fields are dicts, a list of lists, or rows under "0", "1"), each named by its label; one row
    with a dict among its fields stays one row."""
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.json"
    pd.DataFrame(ALPACA).to_json(path, orient=orient)
    records = load_records(path)
    assert [r.fields for r in records] == pd.read_json(path, orient=orient, dtype=False).to_dict("records") == ALPACA
    assert records[1].where.endswith("d.json row 1")
    (tmp_path / "one.json").write_text(json.dumps({"instruction": "a", "output": "b", "meta": {"0": 1}}))
    assert [r.fields["meta"] for r in load_records(tmp_path / "one.json")] == [{"0": 1}]


@pytest.mark.parametrize("name, sep", [("d.tsv", "\t"), ("d.csv", ",")])
def test_a_quote_that_never_closes_is_refused_not_read_as_the_rest_of_the_file(tmp_path, name, sep):
    """A cell opening a quote that never closes (a hand-written TSV whose answer starts with a quote) made the rest
    of the file that cell's text, its rows lost without a word (datasets refuses the file); it is named by the line
    where its row starts. A quoted cell spanning lines to the last row, and a quote inside a cell, still read."""
    datasets = pytest.importorskip("datasets")
    lines = ["prompt", "completion"], ["Q1", "A1"], ["Q2", '"unclosed answer'], ["Q3", "A3"], ["Q4", "A4"]
    path = tmp_path / name
    path.write_text("".join(sep.join(cells) + "\n" for cells in lines))
    with pytest.raises(Exception):
        datasets.load_dataset("csv", data_files=str(path), sep=sep, split="train", cache_dir=str(tmp_path / "c"))
    with pytest.raises(UsageError, match=rf"{name} line 3: a quote opens a cell of this row and never closes, so "
                                         r"lines 4-5, to the end of the file, would be read as that cell's text"):
        load_records(path)
    path.write_text(f'prompt{sep}completion\nQ1{sep}say "hi" now\nQ2{sep}"two\nlines"\n')
    assert [r.fields["completion"] for r in load_records(path)] == ['say "hi" now', "two\nlines"]
