"""--data-fields (flag and YAML), auto-detection of common variants, detection over the first rows,
and errors that say what was found and how to map it."""

from __future__ import annotations

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import Record, normalize
from qlora.train.data.fields import parse_data_fields

ALPACA = (
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
)


def _rows(*fields: dict) -> list[Record]:
    return [Record(f, f"d.jsonl line {i + 1}") for i, f in enumerate(fields)]


def test_columns_keys_and_role_values_are_mapped():
    qa = normalize(_rows({"question": "Name a colour.", "answer": "Blue.", "id": 3}),
                   fields="instruction=question,output=answer")[0]
    assert qa.messages == ALPACA
    dialog = normalize(_rows({"dialog": [{"speaker": "Human", "text": "Name a colour."},
                                         {"speaker": "Bot", "text": "Blue."}]}),
                       fields="messages=dialog,role=speaker,content=text,user=human,assistant=bot")[0]
    assert dialog.messages == ALPACA
    pc = normalize(_rows({"query": "Name a colour.", "reply": "Blue."}), fields="prompt=query,completion=reply")[0]
    assert (pc.prompt, pc.text) == ("Name a colour.", "Blue.")
    system = normalize(_rows({"instruction": "i", "output": "o", "persona": "Be kind."}), fields="system=persona")[0]
    assert system.messages[0] == {"role": "system", "content": "Be kind."}
    roles = normalize(_rows({"messages": [{"role": "sys", "content": "S"}, {"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "a"}]}), fields="system_role=sys")[0]
    assert roles.messages[0]["role"] == "system"


def test_common_variants_are_detected_without_options():
    dolly = normalize(_rows({"instruction": "Summarize.", "context": "A long text.", "response": "Short.",
                             "category": "summarization"}))[0]
    assert dolly.messages == ({"role": "user", "content": "Summarize.\n\nA long text."},
                              {"role": "assistant", "content": "Short."})
    conv = normalize(_rows({"conversations": [dict(m) for m in ALPACA]}))[0]  # ShareGPT column, role/content entries
    msgs = normalize(_rows({"messages": [{"from": "human", "value": "Name a colour."},
                                         {"from": "gpt", "value": "Blue."}]}))[0]  # chat column, from/value entries
    assert conv.messages == msgs.messages == ALPACA
    history = normalize(_rows({"instruction": "And green?", "output": "Also.", "history": [["Name a colour.", "Blue."]]}))[0]
    assert history.messages[:2] == ALPACA and len(history.messages) == 4
    csv_json = normalize(_rows({"messages": '[{"role": "user", "content": "Name a colour."}, '
                                            '{"role": "assistant", "content": "Blue."}]'}))[0]  # CSV cell
    assert csv_json.messages == ALPACA


@pytest.mark.parametrize("row, found, hint", [
    ({"question": "q", "answer": "a", "context": "c"}, "['answer', 'context', 'question']",
     "--data-fields instruction=question,input=context,output=answer;"),
    ({"dialog": [{"speaker": "a", "text": "b"}]}, "['dialog']", "--data-fields messages=dialog"),
    ({"foo": 1}, "['foo']", "--data-fields OURS=THEIRS"),
    ({"content": "def f():\n    return 1\n", "lang": "python", "path": "a.py"}, "['content', 'lang', 'path']",
     "If 'content' holds text to train on whole (as in pre-training), map it with --data-fields text=content"),
    # alpaca's columns, capitalized: the instruction is the prompt and the input its context, not the other way
    ({"Instruction": "Add.", "Input": "2+2", "Output": "4"}, "['Input', 'Instruction', 'Output']",
     "If 'Instruction' is the prompt, 'Input' its context and 'Output' the answer, map them with --data-fields "
     "instruction=Instruction,input=Input,output=Output;"),
    ({"instruction": "Add.", "input": "2+2", "answer": "4"}, "['answer', 'input', 'instruction']",
     "If 'instruction' is the prompt, 'input' its context and 'answer' the answer, map them with --data-fields "
     "output=answer;"),
    # a CSV header written "instruction, input, output"
    ({"instruction": "Add.", " input": "2+2", " output": "4"}, "[' input', ' output', 'instruction']",
     "The column names ' input', ' output' have spaces around them (a CSV header written \"a, b\" keeps the space "
     "after the comma): remove the spaces from the header."),
])
def test_failed_detection_lists_the_fields_and_how_to_map_them(row, found, hint):
    with pytest.raises(UsageError, match="cannot tell the data format") as info:
        normalize(_rows(row))
    assert f"d.jsonl line 1: cannot tell the data format from the fields {found}" in str(info.value)
    assert hint in str(info.value)


def test_detection_looks_past_an_atypical_first_row():
    chat = {"messages": [dict(m) for m in ALPACA]}
    odd_first = _rows({**chat, "text": "also a text"}, chat, chat, chat)
    assert [len(e.messages) for e in normalize(odd_first)] == [2, 2, 2, 2]
    other_first = _rows({"text": "a plain text"}, chat, chat, chat)
    with pytest.raises(UsageError, match=r"d\.jsonl line 1: .*looks like the text format, but the dataset is chat "
                                         r"\(detected from the first 4 rows\)"):
        normalize(other_first)
    later = _rows(chat, chat, chat, {"instruction": "i", "output": "o"})
    with pytest.raises(UsageError, match=r"d\.jsonl line 4: .*looks like the alpaca format"):
        normalize(later)


def test_a_mapped_column_missing_names_the_line():
    rows = _rows({"question": "q", "answer": "a"}, {"question": "q", "reply": "a"})
    with pytest.raises(UsageError, match=r"d\.jsonl line 2: --data-fields maps output=answer, but this row has no "
                                         r"field 'answer'; its fields are \['question', 'reply'\]"):
        normalize(rows, fields="instruction=question,output=answer")


@pytest.mark.parametrize("spec, message", [
    ("question=instruction", r"unknown name 'question'\. Valid names: columns instruction, input, output"),
    ("instruction", "is not of the form OURS=THEIRS"),
    ("output=a,output=b", "output is mapped twice"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_data_fields(spec)


def test_cli_rejects_a_bad_mapping_before_loading_anything(tmp_path, capsys):
    code = main(["train", "--model", "no-model", "--data", str(tmp_path / "d.jsonl"),
                 "--output", str(tmp_path / "out"), "--data-fields", "answer=output"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-fields: unknown name 'answer'" in err and "role values user" in err
    assert "Traceback" not in err


def test_yaml_mapping_and_string(tmp_path):
    for value in ("{instruction: question, output: answer}", '"instruction=question,output=answer"'):
        path = tmp_path / "run.yaml"
        path.write_text(f"model: m\ndata: d.jsonl\noutput: o\ndata_fields: {value}\n")
        config = load_config(path, {})
        assert parse_data_fields(config.data_fields).columns == {"instruction": "question", "output": "answer"}


def test_format_belongs_to_sft_and_data_fields_are_checked_before_eval_loads_a_model(tmp_path, capsys):
    code = main(["train", "--model", "m", "--data", "d.jsonl", "--output", str(tmp_path / "o"), "--method", "dpo",
                 "--format", "chat"])
    err = capsys.readouterr().err
    assert code == 2 and "--format applies to --method sft" in err and "--data-fields" in err
    code = main(["train", "--model", "no-model", "--data", "d.jsonl", "--output",
                 str(tmp_path / "o"), "--method", "dpo", "--data-fields", "question=prompt"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-fields: unknown name 'question'" in err and "Traceback" not in err
    code = main(["eval", "--model", "no-model", "--data", "d.jsonl", "--data-fields", "q=question"])
    err = capsys.readouterr().err
    assert code == 2 and "--data-fields: unknown name 'q'" in err and "Traceback" not in err


def test_a_text_prompt_that_looks_like_json_stays_text():
    example = normalize(_rows({"prompt": "[1, 2, 3]", "completion": " 6"}))[0]
    assert (example.prompt, example.text) == ("[1, 2, 3]", " 6")
