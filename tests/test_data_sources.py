"""Reading datasets from files: every format, and every bad input named by file and line."""

from __future__ import annotations

import importlib.util
import json

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


def test_missing_field_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [ALPACA[0], {"instruction": "no answer", "output": ""}])
    with pytest.raises(UsageError, match=r'd\.jsonl line 2: field "output"'):
        normalize(load_records(path))


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(UsageError, match=r"empty\.jsonl: the dataset is empty"):
        load_records(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(UsageError, match="unknown data format '.txt'"):
        load_records(tmp_path / "d.txt")
    with pytest.raises(UsageError, match="not found"):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(UsageError, match="pip install pyarrow"):
        load_records(tmp_path / "d.parquet")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hub_name_without_datasets_library():
    with pytest.raises(UsageError, match="pip install datasets"):
        load_records("someone/some-dataset")


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
