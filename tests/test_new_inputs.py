"""Damaged and edge inputs to the options and files added with preference methods, schedules, LLaMA-Factory
registries, structured outputs and ``qlora estimate ADAPTER``: each is refused by name (exit 2, no
traceback) or accepted and honoured; none hangs, crashes or is silently read as something else.

Each case here was a traceback, a hang, or a silent misreading before its fix."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager

import pytest
import torch

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.infer.json_prefix import JsonPrefix
from qlora.infer.json_schema import MAX_DEPTH, SchemaError, compile_schema
from qlora.train.config import load_config
from qlora.train.data import normalize
from qlora.train.data.selection import read_sources
from qlora.train.data.unpaired import normalize_unpaired


def _run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@contextmanager
def _within(seconds: int):
    """Fail (instead of hanging the suite) when the block runs longer than ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- structured outputs: schemas ------------------------------------------------------------------------

def test_huge_min_items_compile_at_once_and_are_enforced():
    with _within(10):
        compiled = compile_schema({"type": "array", "items": {"type": "integer"}, "minItems": 10 ** 12})
        with pytest.raises(SchemaError, match="minItems 1000000000, but only 1 items may be written"):
            compile_schema({"type": "array", "prefixItems": [{"type": "integer"}], "items": False,
                            "minItems": 10 ** 9})
    state = JsonPrefix.start(compiled.root, root_object=False).feed("[1, 2")
    assert state is not None and state.feed("]") is None  # two items are not 10^12


def _deep(levels: int, kind: str) -> dict:
    leaf: dict = {"type": "integer"}
    if kind == "ref":  # a chain of $defs, each a $ref to the next
        defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(levels)} | {f"d{levels}": leaf}
        return {"$defs": defs, "$ref": "#/$defs/d0"}
    for _ in range(levels):
        leaf = {"object": {"type": "object", "properties": {"a": leaf}, "required": ["a"]},
                "array": {"type": "array", "items": leaf, "minItems": 1},
                "anyOf": {"anyOf": [leaf, {"type": "null"}]}}[kind]
    return leaf


@pytest.mark.parametrize("kind", ["object", "array", "anyOf", "ref"])
def test_schemas_nested_past_the_limit_are_refused_by_path(kind):
    """1,000 levels were a RecursionError (a 500 in serve); the limit is a SchemaError naming where."""
    with pytest.raises(SchemaError, match=f"nests more than {MAX_DEPTH} levels deep"):
        compile_schema(_deep(1000, kind))
    compile_schema(_deep(MAX_DEPTH - 2, kind))  # deep but within the limit: compiled


# -- training options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr-scheduler", "polynomial", "--lr-scheduler-kwargs", "power=1,power=2"],
     "--lr-scheduler-kwargs: power is given twice"),
    (["--lr-scheduler", "polynomial", "--lr-scheduler-kwargs", '{"power": 1, "power": 2}'],
     "--lr-scheduler-kwargs: power is given twice"),
    (["--method", "dpo", "--loss-type", "sigmoid,ipo", "--loss-weights", "0,0"],
     "--loss-weights 0,0 weighs every loss type by 0"),
])
def test_options_that_would_be_misread_exit_2(flags, message, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    code, err = _run(["train", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o"),
                      *flags], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_zero_loss_weights_with_an_rpo_term_still_learn():
    cfg = load_config(None, dict(model="m", data="d", output="o", method="dpo", loss_type="sigmoid,ipo",
                                 loss_weights="0,0", rpo_alpha=0.5))
    assert cfg.preference_losses() == [("sigmoid", 0.0), ("ipo", 0.0), ("sft", 0.5)]


@pytest.mark.parametrize("line, message", [
    ("optim: [adamw, paged_adamw_8bit]", "line 4: optim takes one value, got a list"),
    ("method: [kto]", "line 4: method takes one value, got a list"),
    ("lr_scheduler: {cosine: 1}", "line 4: lr_scheduler takes one value, got a mapping"),
    ("stage: dpo\npref_loss: [sigmoid]", "line 5: pref_loss takes one loss name, got ['sigmoid']"),
    ("lr_scheduler: polynomial\nlr_scheduler_kwargs:\n  power: 1\n  power: 2",
     "line 7: lr_scheduler_kwargs: 'power' is given twice (first on line 6)"),  # YAML keeps the last silently
])
def test_yaml_lists_and_mappings_for_one_value_options_exit_2(line, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tmp_path}\ndata: d.jsonl\noutput: {tmp_path / 'o'}\n{line}\n")
    code, err = _run(["train", str(config)], capsys)
    assert code == 2 and message in err, err


def test_yaml_lists_still_read_where_an_option_takes_several():
    cfg = load_config(None, dict(model="m", data=["a.jsonl", "b.jsonl"], output="o", method="dpo",
                                 loss_type=["sigmoid", "ipo"], loss_weights=[1, 0.5],
                                 target_modules=["q_proj", "v_proj"]))
    assert (cfg.data, cfg.loss_type, cfg.loss_weights) == ("a.jsonl,b.jsonl", "sigmoid,ipo", "1,0.5")


# -- LLaMA-Factory's dataset_info.json -----------------------------------------------------------------------

_ROWS = [{"instruction": "Say hi.", "output": "Hi!", "ok": True}, {"instruction": "Add 2 and 3.", "output": "5",
                                                                  "ok": "false"}]


def _registry(tmp_path, entry: dict):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    (folder / "rows.json").write_text(json.dumps(_ROWS))
    (folder / "dataset_info.json").write_text(json.dumps({"x": {"file_name": "rows.json"} | entry}))
    return folder


def _read(folder, normalizer=None):
    return read_sources("x", "train", None, 0, normalizer or (lambda records: normalize(records)), str(folder))


def test_a_kto_tag_that_is_not_boolean_is_refused_by_row(tmp_path):
    """The text "false" was read as a desirable label (bool("false") is True)."""
    folder = _registry(tmp_path, {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "ok"}})
    with pytest.raises(UsageError, match=r"rows.json item 1 \(x\): the kto_tag column 'ok' holds 'false'; "
                                         "LLaMA-Factory reads only true or false there"):
        _read(folder, normalize_unpaired)
    rows = json.loads((folder / "rows.json").read_text())
    (folder / "rows.json").write_text(json.dumps([rows[0], rows[1] | {"ok": False}]))
    assert [e.desirable for e in _read(folder, normalize_unpaired)] == [True, False]


@pytest.mark.parametrize("entry, message", [
    ({"ranking": "false"}, "ranking must be true or false, got 'false'"),
    ({"split": ["train"]}, "split must be a non-empty string, got ['train']"),
    ({"subset": 5}, "subset must be a non-empty string, got 5"),
    ({"formatting": "sharegpt", "tags": ["role_tag"]}, "tags must map tag names"),
    ({"formatting": "sharegpt", "tags": {"role_tag": 1}}, "tags must map tag names"),
    ({"columns": {"prompt": "question", "response": "output"}},
     "no row has the column 'question' that its declaration names; its columns are instruction, ok, output"),
])
def test_damaged_entries_are_refused_by_name(entry, message, tmp_path):
    with pytest.raises(UsageError, match="dataset 'x': " if "columns" not in entry else r"\(x\): ") as exc:
        _read(_registry(tmp_path, entry))
    assert message in str(exc.value)


def test_a_file_that_is_also_a_registered_name_is_read_and_named(tmp_path, monkeypatch, capsys):
    folder = _registry(tmp_path, {})
    info = folder / "dataset_info.json"
    info.write_text(json.dumps({"x.jsonl": {"file_name": "rows.json"}}))
    (folder / "x.jsonl").write_text('{"text": "a file named x.jsonl"}\n')
    monkeypatch.chdir(folder)
    examples = read_sources("x.jsonl", "train", None, 0, lambda records: records, str(folder))
    assert [e.fields for e in examples] == [{"text": "a file named x.jsonl"}]
    assert f"--data x.jsonl is a file and also a name registered in {info}; reading the file" in \
        capsys.readouterr().err


# -- qlora estimate ADAPTER ----------------------------------------------------------------------------------

@pytest.fixture()
def adapter(tmp_path, tiny_model_dir):
    import qlora
    from qlora.model.load import load_model

    model, _ = load_model(tiny_model_dir, quant="nf4", compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    return qlora.save_adapter(model, tmp_path / "adapter")


def test_estimate_names_a_damaged_adapter_config(adapter, capsys):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"target_modules": "(q_proj"}))  # a PEFT regex that does not compile
    code, err = _run(["estimate", str(adapter)], capsys)
    assert code == 2 and "target_modules must be a valid regular expression" in err, err
    path.write_text("{nope")
    code, err = _run(["estimate", str(adapter)], capsys)
    assert code == 2 and f"{path} is not valid JSON (line 1)" in err, err
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())  # a BOM, as some editors write it
    code, err = _run(["estimate", str(adapter)], capsys)
    assert code == 0, err
