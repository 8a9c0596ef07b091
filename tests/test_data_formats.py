"""Format detection and normalization to messages or text."""

from __future__ import annotations

import pytest

from qlora.errors import UsageError
from qlora.train.data import Record, detect_format, normalize

CASES = {
    "alpaca": ({"instruction": "Add", "input": "2+2", "output": "4"},
               [{"role": "user", "content": "Add\n\n2+2"}, {"role": "assistant", "content": "4"}]),
    "chat": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}]},
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}]),
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                    {"from": "gpt", "value": "Hello"}]},
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello"}]),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_detect_and_normalize(fmt):
    fields, messages = CASES[fmt]
    record = Record(fields, "d.jsonl line 1")
    assert detect_format(record) == fmt
    (example,) = normalize([record])
    assert list(example.messages) == messages and example.text is None


def test_alpaca_without_input_and_text_format():
    (a,) = normalize([Record({"instruction": "Say hi", "input": "", "output": "hi"}, "x")])
    assert a.messages[0] == {"role": "user", "content": "Say hi"}
    (t,) = normalize([Record({"text": "plain words"}, "x")])
    assert detect_format(Record({"text": "plain words"}, "x")) == "text"
    assert t.text == "plain words" and t.messages is None


def test_format_override_and_unknown():
    record = Record({"text": "t", "instruction": "i", "output": "o"}, "x")
    assert detect_format(record) == "alpaca"
    assert normalize([record], fmt="text")[0].text == "t"
    with pytest.raises(UsageError, match="unknown data format 'yaml'"):
        normalize([record], fmt="yaml")
    with pytest.raises(UsageError, match=r"d\.jsonl line 4: cannot tell the data format"):
        detect_format(Record({"query": "p"}, "d.jsonl line 4"))


@pytest.mark.parametrize("fields, message", [
    ({"messages": [{"role": "user"}]}, r'line 9, message 0: each entry needs string fields "role" and "content"'),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role 'wizard'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown ShareGPT speaker 'alien'"),
    ({"conversations": 5}, 'field "conversations" must be a non-empty list'),  # [] is skipped: test_data_empty_rows
    ({"instruction": "i", "output": {"text": "o"}}, 'field "output" must be a string, got dict'),
])
def test_bad_records_name_their_line(fields, message):
    with pytest.raises(UsageError, match=message):
        normalize([Record(fields, "d.jsonl line 9")])


def test_lima_turns_as_plain_strings_alternate_user_and_assistant():
    rows = [Record({"conversations": ["What is 2+2?", "4.", "And 3+3?", "6."], "source": "lima"}, "lima.jsonl line 1")]
    (example,) = normalize(rows)
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("user", "What is 2+2?"), ("assistant", "4."), ("user", "And 3+3?"), ("assistant", "6.")]
    with pytest.raises(UsageError, match="message 1: each message must be an object"):  # mixed: not LIMA's shape
        normalize([Record({"conversations": [{"from": "human", "value": "hi"}, "yo"]}, "x.jsonl line 1")])


def test_hh_texts_without_prompt_split_at_their_shared_start():
    from qlora.train.data.preference import normalize_preferences

    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    (pair,) = normalize_preferences([Record(row, "hh.jsonl line 1")])
    assert (pair.prompt, pair.chosen, pair.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go away.")
    for chosen, rejected, what in (("abc", "xyz", "share no start"), ("same text", "same text, longer", "do not differ")):
        with pytest.raises(UsageError, match=f'hh.jsonl line 2: field "prompt" is missing.*{what}'):
            normalize_preferences([Record({"chosen": chosen, "rejected": rejected}, "hh.jsonl line 2")])


def test_a_json_object_holding_its_rows_under_a_name_says_where_they_are(tmp_path):
    """A .json file whose one object keeps its rows under split names ({"train": [...], "test": [...]}) or another
    wrapper name is told to give that list alone (it was told to map the rows as a conversation's messages); a
    conversation under an unknown name ({"speaker", "text"} entries) keeps the messages hint."""
    import json

    from qlora.train.data import load_records

    rows = [{"instruction": "Add", "output": "4"}, {"instruction": "Say hi", "output": "hi"}]
    (tmp_path / "splits.json").write_text(json.dumps({"train": rows, "test": rows[:1]}))
    with pytest.raises(UsageError, match=r"splits\.json line 1: cannot tell the data format .* The field 'train' holds "
                                         r"a list of 2 rows of the alpaca format, not one example's field: give that "
                                         r"list alone as the data \(e\.g\. jq '\.train' FILE > train\.json\), or name "
                                         r"it \"data\" .* 'test' holds rows too") as error:
        normalize(load_records(tmp_path / "splits.json"))
    assert "messages=train" not in str(error.value)
    turns = [{"speaker": "user", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]
    with pytest.raises(UsageError, match=r"The field 'turns' holds a list of objects: if it is the conversation, map "
                                         r"it with --data-fields messages=turns"):
        normalize([Record({"id": "a", "turns": turns}, "d.jsonl line 1")])


def _sharegpt(system, *turns):
    return {"system": system, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_a_system_column_beside_a_system_turn_first_gives_way_to_the_turn_and_says_so(capsys):
    """LLaMA-Factory's ShareGPT reader and axolotl's chat_template keep a conversation's own first system turn and
    leave the ``system`` column unread; a conversation that does not begin with one gets the column first (axolotl
    puts it there even before a later system turn, where qlora dropped the column). A column that differs from the
    turn it loses to is said once, naming the first such row and how many."""
    rows = [_sharegpt("COLUMN", ("system", "TURN"), ("human", "hi"), ("gpt", "yo")),
            _sharegpt("COLUMN", ("human", "hi"), ("gpt", "yo"), ("system", "LATER"), ("human", "and"), ("gpt", "ok")),
            _sharegpt("SAME", ("system", "SAME"), ("human", "hi"), ("gpt", "yo")),
            _sharegpt("COLUMN 2", ("system", "TURN 2"), ("human", "hi"), ("gpt", "yo"))]
    examples = normalize([Record(r, f"d.jsonl line {i + 1}") for i, r in enumerate(rows)])
    assert [[m["content"] for m in e.messages if m["role"] == "system"] for e in examples] == [
        ["TURN"], ["COLUMN", "LATER"], ["SAME"], ["TURN 2"]]
    err = capsys.readouterr().err
    assert err.count("qlora: ") == 1 and err.startswith(
        'qlora: d.jsonl line 1 (and 1 more rows): a "system" column beside a conversation that begins with a '
        "different system turn: the turn is used and the column not read")
    normalize([Record(rows[2], "d.jsonl line 1")])
    assert capsys.readouterr().err == ""


def test_alpaca_columns_beside_a_text_column_are_trained_and_the_text_named(capsys):
    """tatsu-lab/alpaca's rows hold each example written out in the Stanford prompt (``text``) beside its columns:
    the columns are trained (as LLaMA-Factory and axolotl read alpaca rows, the model's chat template around them),
    and the run says once that ``text`` is not read and how to train it instead; --format text does, and a format
    given (--format alpaca) is not remarked on."""
    row = {"instruction": "Give a tip", "input": "", "output": "Sleep.",
           "text": "Below is an instruction that describes a task.\n\n### Instruction:\nGive a tip\n\n"
                   "### Response:\nSleep."}
    records = [Record(row, f"d.jsonl line {i + 1}") for i in range(2)]
    examples = normalize(records)
    assert [e.messages for e in examples] == [({"role": "user", "content": "Give a tip"},
                                               {"role": "assistant", "content": "Sleep."})] * 2
    assert capsys.readouterr().err == (
        'qlora: d.jsonl line 1: the rows are read as the alpaca format (detected from the first 2 rows) and also have '
        'a "text" column, which is not read (the columns are trained, as LLaMA-Factory and axolotl read them); '
        "--format text trains that column instead.\n")
    assert [e.text for e in normalize(records, "text")] == [row["text"]] * 2
    normalize(records, "alpaca")
    assert capsys.readouterr().err == ""
