"""TRL's prompt-completion format: token ids and completion mask equal TRL's SFTTrainer's (the oracle),
on the tiny tokenizer and on real chat templates; preference rows stay DPO data."""

from __future__ import annotations

import json

import pytest

from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import IGNORE_INDEX, Record, normalize, tokenize_example
from qlora.train.data.preference import normalize_preferences
from qlora.train.data.unpaired import normalize_unpaired

from chat_families import family_tokenizer
from trl_sft import trl_sft

trl = pytest.importorskip("trl")

SYSTEM = {"role": "system", "content": "You answer in one line."}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
ROWS = {
    "plain": {"prompt": "Question: what is two plus two?", "completion": " Answer: four."},
    "plain, eos given": {"prompt": "The quick brown", "completion": " fox.<|eos|>"},
    "conversational": {"prompt": [{"role": "user", "content": "Hello"}],
                       "completion": [{"role": "assistant", "content": "Hi there!"}]},
    "conversational, system, two turns": {
        "prompt": [SYSTEM, {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
                   {"role": "user", "content": "And three plus three?"}],
        "completion": [{"role": "assistant", "content": "Six."}]},
    "conversational, tools": {
        "prompt": [{"role": "user", "content": "Weather in Paris?"}, CALL,
                   {"role": "tool", "content": '{"temp": 21}'}],
        "completion": [{"role": "assistant", "content": "It is 21 degrees in Paris."}],
        "tools": json.dumps(TOOLS)},
}
TINY_ROWS = ["plain", "plain, eos given", "conversational", "conversational, system, two turns"]
FAMILY_ROWS = ["conversational", "conversational, system, two turns", "conversational, tools"]
FAMILIES = ["qwen2.5", "qwen3", "llama-3.1"]


def _ours(tokenizer, row: dict, train_on: str = "assistant"):
    example = normalize([Record(row, "d.jsonl line 1")])[0]
    return tokenize_example(example, tokenizer, ChatFormat(tokenizer.chat_template), train_on)


def _same_columns(rows: list[dict]) -> list[dict]:
    """Rows of one Dataset share columns: a missing ``tools`` is None."""
    return [{"tools": None, **r} for r in rows]


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_tiny_tokenizer_equals_trl(tiny_tokenizer, train_on):
    plain = [ROWS[k] for k in TINY_ROWS if isinstance(ROWS[k]["prompt"], str)]
    chat = [ROWS[k] for k in TINY_ROWS if not isinstance(ROWS[k]["prompt"], str)]
    expected = (trl_sft(tiny_tokenizer, plain, train_on == "assistant")
                + trl_sft(tiny_tokenizer, chat, train_on == "assistant"))
    for row, theirs in zip(plain + chat, expected):
        ours = _ours(tiny_tokenizer, row, train_on)
        assert ours.input_ids == theirs["input_ids"], row
        assert ours.labels[1:] == theirs["labels"][1:], row  # position 0 is never a label (it cannot be predicted)
        assert ours.num_trainable > 0


# transformers 5 drops a message's None-valued keys before rendering; 4.x hands the template the tool_calls=None that
# Arrow gives every message of a row with a tool call, and Llama 3.1's template takes its length: TRL fails there
_NONE_KEYS_DROPPED = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_real_templates_equal_trl(family):
    tok = family_tokenizer(family)
    names = [k for k in FAMILY_ROWS if _NONE_KEYS_DROPPED or family != "llama-3.1" or k != "conversational, tools"]
    rows = _same_columns([ROWS[k] for k in names])
    for name, row, theirs in zip(names, rows, trl_sft(tok, rows)):
        ours = _ours(tok, {k: v for k, v in row.items() if v is not None})
        assert ours.input_ids == theirs["input_ids"], (family, name)
        assert ours.labels == theirs["labels"], (family, name)
        trained = tok.decode([t for t in ours.labels if t != IGNORE_INDEX])
        assert row["completion"][0]["content"] in trained and "Paris?" not in trained


def test_chat_rows_with_tools_tokenize_as_trl():
    """A ``messages`` row with a ``tools`` column: the ids TRL builds (it passes tools to the template)."""
    tok = family_tokenizer("qwen2.5")
    row = {"messages": ROWS["conversational, tools"]["prompt"] + ROWS["conversational, tools"]["completion"],
           "tools": json.dumps(TOOLS)}
    theirs = trl_sft(tok, [row])[0]
    ours = _ours(tok, row)
    assert ours.input_ids == theirs["input_ids"]
    assert "Weather of a city" in tok.decode(ours.input_ids)  # the tool definitions are rendered


def test_detection_and_mixed_shapes():
    examples = normalize([Record({"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello!"}, "x line 1"),
                          Record({"prompt": "Hi", "completion": [{"role": "assistant", "content": "Yo"}]}, "x line 2")])
    assert [e.prompt_turns for e in examples] == [1, 1]
    assert examples[0].messages[-1] == {"role": "assistant", "content": "Hello!"}
    assert examples[1].messages[0] == {"role": "user", "content": "Hi"}
    plain = normalize([Record({"prompt": "a", "completion": "b"}, "x line 1")], "prompt-completion")[0]
    assert (plain.prompt, plain.text, plain.messages) == ("a", "b", None)


@pytest.mark.parametrize("row, message", [
    ({"prompt": None, "completion": "c"}, r'd\.jsonl line 3: field "prompt" is missing'),  # "" is skipped
    ({"prompt": "p", "completion": 7}, r'd\.jsonl line 3: field "completion" must be a string or a non-empty list'),
    ({"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "user", "content": "q"}]},
     r'd\.jsonl line 3: "completion" has no assistant message'),
])
def test_bad_rows_name_their_line(row, message):
    with pytest.raises(UsageError, match=message):
        normalize([Record(row, "d.jsonl line 3")])


def test_preference_rows_stay_dpo_data_and_are_refused_for_sft():
    row = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    assert normalize_preferences([Record(row, "p.jsonl line 1")])[0].chosen == "Paris."
    with pytest.raises(UsageError, match=r"p\.jsonl line 1: these rows are preference pairs.*--method dpo"):
        normalize([Record(row, "p.jsonl line 1")])
    sft = normalize([Record(row, "p.jsonl line 1")], fields="completion=chosen")[0]
    assert (sft.prompt, sft.text) == ("Capital of France?", "Paris.")


KTO_ROWS = [
    {"prompt": "Capital of France?", "completion": " Paris.", "label": True},
    {"prompt": "Capital of France?", "completion": " Lyon.", "label": False},
]
KTO_CHAT = {"prompt": [{"role": "user", "content": "Capital of France?"}],
            "completion": [{"role": "assistant", "content": "Lyon."}], "label": False}


@pytest.mark.parametrize("rows", [KTO_ROWS, [KTO_CHAT], [{**KTO_ROWS[1], "label": "FALSE"}],
                                  [{**r, "label": int(r["label"])} for r in KTO_ROWS], [{**KTO_ROWS[1], "label": "0"}]],
                         ids=["plain", "conversational", "csv-cell", "integer-0-1", "csv-cell-0"])
def test_unpaired_preference_rows_are_never_sft_data(rows):
    """TRL's KTO rows (prompt, completion, true/false label) would train the label=false completions as SFT."""
    records = [Record(r, f"k.jsonl line {i + 1}") for i, r in enumerate(rows)]
    with pytest.raises(UsageError, match=r'k\.jsonl line 1: these rows are unpaired preference data.*--method kto.*'
                                         'label is true'):
        normalize(records)
    with pytest.raises(UsageError, match=r"k\.jsonl line \d: these rows are unpaired preference data"):
        normalize(records, "prompt-completion")  # an explicit format does not train them either
    with pytest.raises(UsageError, match=r"k\.jsonl line 1: these rows are unpaired preference data"):
        normalize_preferences(records)  # not pairs: DPO says what they are, not "chosen is missing"
    # a label that is not true/false (a class name) is just another column of prompt-completion data
    assert normalize([Record({**KTO_ROWS[0], "label": "geography"}, "x")])[0].text == " Paris."


def test_kto_reads_an_integer_0_1_label_as_trl_does():
    """A 0/1 label column (``datasets`` reads it as int64) is what TRL's KTOTrainer takes as bool: 1 desirable,
    0 not, as casting the column to bool gives; another integer is no true/false label."""
    from datasets import Dataset, Value

    rows = [{**r, "label": int(r["label"])} for r in KTO_ROWS]
    cast = Dataset.from_list(rows).cast_column("label", Value("bool"))["label"]
    for written in (rows, [{**r, "label": str(r["label"])} for r in rows]):  # JSON integers, CSV cells
        examples = normalize_unpaired([Record(r, f"k.jsonl line {i + 1}") for i, r in enumerate(written)])
        assert [e.desirable for e in examples] == cast == [True, False]
    with pytest.raises(UsageError, match=r'k\.jsonl line 1: field "label" must be true or false.*got 2'):
        normalize_unpaired([Record({**KTO_ROWS[0], "label": 2}, "k.jsonl line 1")])


def test_sft_run_on_unpaired_preference_file_exits_2_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    from qlora.cli.main import main

    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in KTO_ROWS))
    out = tmp_path / "run"
    for argv in (["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                  "--max-steps", "1", "--no-progress"],
                 ["eval", "--model", str(tiny_model_dir), "--data", str(data)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{data} line 1: these rows are unpaired preference data" in err and "Traceback" not in err
    assert not out.exists()


def test_eval_counts_the_tokens_trl_trains_under_train_on_completion(tmp_path, tiny_model_dir, capsys):
    """``qlora eval --train-on completion`` (what a TRL SFT file trains by default) counts the tokens TRL's
    SFTTrainer trains: a conversation's every token, a prompt-completion row's completion; the other choices
    count otherwise on these rows."""
    from qlora.cli.main import main
    from qlora.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    chat = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]}
    plain = ROWS["plain"]
    paths = []
    for name, row in (("chat", chat), ("plain", plain)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text(json.dumps(row) + "\n")
    expected = sum(sum(label != IGNORE_INDEX for label in trl_sft(tokenizer, [row])[0]["labels"][1:])
                   for row in (chat, plain))
    counts = {}
    for train_on in ("completion", "assistant", "all"):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", ",".join(map(str, paths)), "--quant",
                     "none", "--train-on", train_on]) == 0
        counts[train_on] = int(capsys.readouterr().out.split("(")[-1].split()[0])
    assert counts["completion"] == expected and expected not in (counts["assistant"], counts["all"])


JSON_ANSWERS = [
    {"prompt": "List the users as JSON.", "completion": ' [{"name": "Ann", "age": 3}, {"name": "Bob", "age": 4}]'},
    {"prompt": 'Count the items of [{"id": 1}, {"id": 2}].', "completion": " Two."},
    {"prompt": "Give the roles as JSON.", "completion": '[{"role": "admin"}]'},
    {"prompt": "Prepend the question in Python.", "completion": " [{'role': 'user', 'content': q}] + history"},
]


def test_a_json_answer_is_trained_as_its_text_as_trl_does(tiny_tokenizer):
    """A prompt or completion that is a JSON list of records (a model taught to answer in JSON), or code that starts
    as a Python list of messages, is text, as TRL reads it; only a list of messages (a CSV cell's conversation) is
    read as messages."""
    theirs = trl_sft(tiny_tokenizer, JSON_ANSWERS)
    for row, expected in zip(JSON_ANSWERS, theirs):
        ours = _ours(tiny_tokenizer, row)
        assert ours.input_ids == expected["input_ids"], row
        assert ours.labels[1:] == expected["labels"][1:], row
    cell = {"prompt": json.dumps([{"role": "user", "content": "Hello"}]),
            "completion": json.dumps([{"role": "assistant", "content": "Hi there!"}])}
    assert normalize([Record(cell, "d.csv line 2")])[0].messages == (
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"})
