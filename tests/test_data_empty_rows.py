"""Rows with nothing to train, as real datasets hold a few among thousands (alpaca-cleaned and Dolly rows with an
empty answer, parquet nulls, conversations with no turns): skipped and counted in the run log, like blank texts;
a dataset of nothing else is refused naming its rows. Malformed rows are still refused with their file and line.

Oracle: the examples kept tokenize exactly as the same good rows do in a file without the empty ones."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import load_records, normalize, tokenize_dataset

from conftest import QWEN_TEMPLATE as QWEN
USER, ASSISTANT = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}


def _write(path: Path, rows) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# (good row, empty row, skip reason): each empty row as a public dataset holds it
CASES = {
    "alpaca-cleaned": ({"instruction": "Say hi.", "input": "", "output": "Hi."},
                       {"instruction": "Give an example.", "input": "", "output": ""}, "an empty answer"),
    "alpaca-blank": ({"instruction": "Say hi.", "input": "", "output": "Hi."},
                     {"instruction": "Say it.", "input": "", "output": "  \n"}, "an empty answer"),
    "dolly": ({"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "open_qa"},
              {"instruction": "Summarize.", "context": "A text.", "response": "", "category": "summarization"},
              "an empty answer"),
    "prompt-completion": ({"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": ""},
                          "an empty answer"),
    "prompt-completion-null": ({"prompt": "2+2=", "completion": " 4"}, {"prompt": "3+3=", "completion": None},
                               "an empty answer"),
    "prompt-completion-chat": ({"prompt": [USER], "completion": [ASSISTANT]},
                               {"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]},
                               "an empty answer"),
    "messages-last-turn": ({"messages": [USER, ASSISTANT]},
                           {"messages": [USER, ASSISTANT, USER, {"role": "assistant", "content": ""}]},
                           "an empty answer"),
    "sharegpt-last-turn": ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
                           {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": ""}]},
                           "an empty answer"),
    "messages-null-answer": ({"messages": [USER, ASSISTANT]},
                             {"messages": [USER, {"role": "assistant", "content": None}]}, "an empty answer"),
    "sharegpt-null-value": ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
                            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": None}]},
                            "an empty answer"),
    "messages-no-turns": ({"messages": [USER, ASSISTANT]}, {"messages": []}, "no messages"),
    "sharegpt-no-turns": ({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
                          {"conversations": []}, "no messages"),
}


@pytest.mark.parametrize("name", CASES)
def test_an_empty_row_is_skipped_and_counted(tmp_path, qwen_tokenizer, name):
    good, empty, reason = CASES[name]
    path = _write(tmp_path / "data.jsonl", [good, empty, good])
    tokenized, report = tokenize_dataset(normalize(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    alone, _ = tokenize_dataset(normalize(load_records(_write(tmp_path / "good.jsonl", [good]))), qwen_tokenizer,
                                ChatFormat(QWEN))
    assert [t.index for t in tokenized] == [0, 2]
    assert [(t.input_ids, t.labels) for t in tokenized] == [(alone[0].input_ids, alone[0].labels)] * 2
    assert report.empty == {reason: [f"{path} line 2"]}
    assert f"1 skipped with {reason} (first: {path} line 2)" in report.summary()


def test_parquet_nulls_and_numbers_in_alpaca_columns(tmp_path, qwen_tokenizer):
    """Typed parquet sources: a null answer is an empty one, a null input none, a numeric answer its text, and an
    empty instruction leaves the task to the input."""
    numbers = _write(tmp_path / "numbers.parquet", [{"instruction": "What is 2+2?", "input": None, "output": 4},
                                                    {"instruction": "What is 6+6?", "input": None, "output": 12},
                                                    {"instruction": "Say nothing.", "input": None, "output": None}])
    examples = normalize(load_records(numbers))
    assert [e.messages for e in examples[:2]] == [
        ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}),
        ({"role": "user", "content": "What is 6+6?"}, {"role": "assistant", "content": "12"})]
    _, report = tokenize_dataset(examples, qwen_tokenizer, ChatFormat(QWEN))
    assert report.empty == {"an empty answer": [f"{numbers} row 2"]}
    texts = _write(tmp_path / "texts.parquet", [{"instruction": "", "input": "Translate: chat", "output": "cat"}])
    assert normalize(load_records(texts))[0].messages[0] == {"role": "user", "content": "Translate: chat"}


def test_an_answer_with_a_tool_call_or_reasoning_is_not_empty(tmp_path):
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    thinking = {"role": "assistant", "content": None, "reasoning_content": "Nothing to add."}
    path = _write(tmp_path / "data.jsonl", [{"messages": [USER, call]}, {"messages": [USER, thinking]},
                                            {"messages": [USER, {**ASSISTANT, "content": ""}, USER, ASSISTANT]},
                                            {"messages": [USER, {**ASSISTANT, "content": "", "weight": 0}, USER,
                                                          ASSISTANT]}])
    # an empty turn anywhere would be trained as an immediate end of turn; one with weight 0 is not trained
    assert [e.skip for e in normalize(load_records(path))] == [None, None, "an empty answer", None]


def test_a_dataset_of_empty_rows_is_refused_naming_them(tmp_path, qwen_tokenizer):
    path = _write(tmp_path / "data.jsonl", [{"instruction": "A?", "output": ""}, {"instruction": "B?", "output": ""},
                                            {"instruction": "", "input": "", "output": "C."}])
    with pytest.raises(UsageError) as error:
        tokenize_dataset(normalize(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    assert str(error.value).startswith(
        f"all 3 rows of the data have nothing to train: 2 with an empty answer (first: {path} line 1, {path} line 2); "
        f"1 with an empty instruction (first: {path} line 3).")


@pytest.mark.parametrize("row, error", [
    ({"messages": [{"role": "narrator", "content": "Hi"}]}, r"line 1, message 0: unknown role 'narrator'"),
    ({"messages": "hello"}, r'line 1: field "messages" must be a non-empty list'),
    ({"messages": [{"role": "user", "content": True}]}, r'line 1, message 0: "content" must be a string, a '
                                                        r"number or a list of text parts, got true"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     r'line 1, message 0: content part 0 is a text part whose "text" is null; it must be a string'),
    ({"messages": [{"role": None, "content": "Hi"}]}, r'line 1, message 0: "role" must be a string naming the '
                                                     r"speaker, got None"),
    ({"conversations": [{"from": "human"}]}, r'line 1, message 0: each entry needs string fields "from" and "value"'),
    ({"instruction": "A?", "output": [{"text": "A."}]}, r'line 1: field "output" must be a string, got list'),
    ({"instruction": "A?", "output": True}, r'line 1: field "output" must be a string, got bool'),
    ({"prompt": "A?", "completion": {"text": "B"}}, r'line 1: field "completion" must be a string or a non-empty'),
])
def test_malformed_rows_are_still_refused_with_file_and_line(tmp_path, row, error):
    path = _write(tmp_path / "data.jsonl", [row])
    with pytest.raises(UsageError, match=rf"^{path} {error}"):
        normalize(load_records(path))


def test_a_number_as_a_message_is_its_text_as_a_chat_template_renders_it(tmp_path, qwen_tokenizer):
    """{"from": "gpt", "value": 42} (a numeric answer column turned into turns): transformers' apply_chat_template,
    which TRL's SFTTrainer calls on such rows, renders the number's text where the template prints the content
    ({{ message['content'] }}, as Llama 2's and Mistral's; one that adds strings, as Qwen's, fails on it instead);
    qlora trains the same text, under every template."""
    printing = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    rows = [{"conversations": [{"from": "human", "value": "6*7?"}, {"from": "gpt", "value": 42}]},
            {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": -0.125}]},
            {"messages": [{"role": "user", "content": "big?"}, {"role": "assistant", "content": 12345678901234567890}]}]
    for k, row in enumerate(rows):  # a file a format
        [example] = normalize(load_records(_write(tmp_path / f"numbers{k}.jsonl", [row])))
        raw = [{"role": {"human": "user", "gpt": "assistant"}.get(m.get("from"), m.get("role")),
                "content": m.get("value", m.get("content"))} for m in next(iter(row.values()))]
        assert list(example.messages) == [{**m, "content": m["content"] if isinstance(m["content"], str) else
                                           str(m["content"])} for m in raw]
        assert qwen_tokenizer.apply_chat_template(list(example.messages), chat_template=printing, tokenize=False) \
            == qwen_tokenizer.apply_chat_template(raw, chat_template=printing, tokenize=False)


def test_cli_train_skips_empty_answers_and_refuses_all_empty(tmp_path, tiny_model_dir, capsys):
    rows = [{"instruction": f"Double {a}.", "input": "", "output": f"{2 * a}."} for a in range(4)]
    path = _write(tmp_path / "alpaca.jsonl", rows[:2] + [{"instruction": "Nothing.", "input": "", "output": ""}] + rows[2:])
    args = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"), "--seq-len", "128",
            "--max-steps", "1", "--no-progress"]
    assert main([*args, "--data", str(path)]) == 0
    log = "".join(capsys.readouterr())
    assert f"data: 5 examples, 0 truncated to --seq-len, 1 skipped with an empty answer (first: {path} line 3); " \
           "4 examples" in log
    empty = _write(tmp_path / "empty.jsonl", [{"instruction": "Nothing.", "input": "", "output": ""}])
    assert main([*args[:4], str(tmp_path / "run2"), *args[5:], "--data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"the one row of the data has nothing to train: 1 with an empty answer (first: {empty} line 1)" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("empty", [
    {"prompt": "Q?", "chosen": "Yes.", "rejected": ""},
    {"prompt": "Q?", "chosen": None, "rejected": "No."},  # a parquet null
    {"chosen": "\n\nHuman: Q?\n\nAssistant: Yes.", "rejected": ""},  # Anthropic HH's whole texts
    {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": " "}]},
])
def test_preference_pairs_with_an_empty_answer_are_skipped(tmp_path, qwen_tokenizer, empty):
    from qlora.train.data.preference import normalize_preferences, tokenize_pairs
    from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

    good = {"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}
    path = _write(tmp_path / "pairs.jsonl", [good, empty])
    pairs, report = tokenize_pairs(normalize_preferences(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    assert [p.index for p in pairs] == [0] and report.empty == {"an empty answer": [f"{path} line 2"]}
    # KTO reads a pair as two examples: the half with an answer stays where the pair has a prompt to give it
    units, report = tokenize_unpaired(normalize_unpaired(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    # units 2 and 3 are the second pair's chosen and rejected halves: the one with an answer stays
    kept = [0, 1] + ([2 if empty["chosen"] else 3] if isinstance(empty.get("prompt"), (str, list)) else [])
    assert [u.index for u in units] == kept
    assert len(report.empty["an empty answer"]) == 4 - len(kept)
    with pytest.raises(UsageError, match=rf"^the one preference pair of the data has nothing to train: 1 with an "
                                         rf"empty answer \(first: {tmp_path / 'one.jsonl'} line 1\)"):
        tokenize_pairs(normalize_preferences(load_records(_write(tmp_path / "one.jsonl", [empty]))), qwen_tokenizer,
                       ChatFormat(QWEN))


def test_kto_rows_with_an_empty_completion_are_skipped(tmp_path, qwen_tokenizer):
    from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

    rows = [{"prompt": "Q?", "completion": "Yes.", "label": True}, {"prompt": "Q?", "completion": "", "label": False},
            {"prompt": [USER], "completion": [{"role": "assistant", "content": ""}], "label": True}]
    path = _write(tmp_path / "kto.jsonl", rows)
    units, report = tokenize_unpaired(normalize_unpaired(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    assert [u.index for u in units] == [0]
    assert report.empty == {"an empty answer": [f"{path} line 2", f"{path} line 3"]}
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Q?", "completion": "", "label": "maybe"}])
    with pytest.raises(UsageError, match=rf'^{bad} line 1: field "label" must be true or false'):
        normalize_unpaired(load_records(bad))


def test_kto_pairs_skipped_whole_name_each_line_once(tmp_path, qwen_tokenizer):
    """KTO trains a pair's two answers apart: where both are skipped, the report counts two examples and names
    their line once, not the same line twice in its first five."""
    from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

    long = "The quick brown fox jumps over the lazy dog. " * 40
    rows = [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}] + [
        {"prompt": long, "chosen": "Yes.", "rejected": "No."}] * 3 + [{"prompt": "Q?", "chosen": "Same.",
                                                                         "rejected": "Same."}] * 2
    path = _write(tmp_path / "pairs.jsonl", rows)
    units, report = tokenize_unpaired(normalize_unpaired(load_records(path)), qwen_tokenizer, ChatFormat(QWEN),
                                      seq_len=64)
    assert [u.index for u in units] == [0, 1]
    lines = ", ".join(f"{path} line {n}" for n in (2, 3, 4))
    assert f"6 skipped with a prompt that fills --seq-len, leaving no answer token (first: {lines})" in report.summary()
    assert f"4 skipped whose chosen and rejected answers are the same (first: {path} line 5, {path} line 6)" in (
        report.summary())
    ties = _write(tmp_path / "ties.jsonl", rows[4:])
    with pytest.raises(UsageError, match=rf"are the same \(first: {ties} line 1, {ties} line 2\): nothing to learn"):
        tokenize_unpaired(normalize_unpaired(load_records(ties)), qwen_tokenizer, ChatFormat(QWEN))


def test_cli_dpo_skips_a_pair_with_an_empty_answer(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"Double {a}.", "chosen": f"{2 * a}.", "rejected": f"{a}."} for a in range(3)]
    path = _write(tmp_path / "pairs.jsonl", rows + [{"prompt": "Double 9.", "chosen": "18.", "rejected": ""}])
    assert main(["train", "--method", "dpo", "--model", str(tiny_model_dir), "--data", str(path), "--output",
                 str(tmp_path / "run"), "--seq-len", "128", "--max-steps", "1", "--no-progress"]) == 0
    assert f"1 skipped with an empty answer (first: {path} line 4)" in "".join(capsys.readouterr())


def test_an_image_row_without_instruction_is_trained_not_skipped(tmp_path):
    """A captioning row (LLaMA-Factory alpaca: an image, no instruction) has a prompt: its image."""
    from image_models import write_png

    write_png(tmp_path / "a.png", 8, 8, 0)
    path = _write(tmp_path / "data.jsonl", [{"instruction": "", "input": "", "output": "A red square.",
                                             "images": ["a.png"]}])
    (example,) = normalize(load_records(path))
    assert example.skip is None and len(example.images) == 1
    assert example.messages[0]["content"][0] == {"type": "image"}


def test_images_beside_a_conversation_without_a_user_turn_are_refused(tmp_path):
    from image_models import write_png

    write_png(tmp_path / "a.png", 8, 8, 0)
    path = _write(tmp_path / "data.jsonl", [{"conversations": [{"from": "system", "value": "Describe."},
                                                               {"from": "gpt", "value": "A red square."}],
                                             "images": ["a.png"]}])
    with pytest.raises(UsageError, match=rf"^{path} line 1: .*no user turn"):
        normalize(load_records(path))


def test_a_dataset_whose_image_rows_are_all_skipped_is_refused_naming_them(tmp_path, qwen_tokenizer):
    """Rows skipped while tokenized (images that do not fit --seq-len) are named, as rows skipped when read are."""
    from image_models import write_png

    write_png(tmp_path / "a.png", 8, 8, 0)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}, ASSISTANT]}] * 2
    path = _write(tmp_path / "data.jsonl", rows + [{"messages": [USER, {**ASSISTANT, "content": ""}]}])
    examples = normalize(load_records(path))
    with pytest.raises(UsageError) as error:
        tokenize_dataset(examples, qwen_tokenizer, ChatFormat(QWEN), with_images=lambda e, i: "images too long")
    assert str(error.value).startswith(
        f"all 3 rows of the data have nothing to train: 2 with images too long (first: {path} line 1, {path} line 2); "
        f"1 with an empty answer (first: {path} line 3).")


def test_rows_whose_images_do_not_fit_are_refused_with_the_seq_len_to_raise(tmp_path, qwen_tokenizer):
    """Image rows skipped for --seq-len are not missing answers: the refusal says to raise --seq-len, and names them
    beside text rows truncated to nothing rather than counting every row as truncated."""
    from image_models import write_png
    from qlora.chat.tokenize import IMAGES_TOO_LONG, tokenize_example

    write_png(tmp_path / "a.png", 8, 8, 0)
    image_row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]}, ASSISTANT]}
    path = _write(tmp_path / "data.jsonl", [image_row, {"messages": [USER, ASSISTANT]}])
    examples = normalize(load_records(path))
    fmt = ChatFormat(QWEN)
    with pytest.raises(UsageError) as error:
        tokenize_dataset(examples[:1], qwen_tokenizer, fmt, with_images=lambda e, i: IMAGES_TOO_LONG)
    assert "raise --seq-len so that their images fit" in str(error.value)
    assert "with answers" not in str(error.value)

    def tokenize(example, index):
        if example.images:
            return IMAGES_TOO_LONG
        return tokenize_example(example, qwen_tokenizer, fmt, "assistant", 4, index=index)

    with pytest.raises(UsageError) as error:
        tokenize_dataset(examples, qwen_tokenizer, fmt, seq_len=4, with_images=tokenize)
    assert str(error.value) == (
        f"all 2 rows of the data have nothing to train: 1 with images that do not fit --seq-len (first: {path} line "
        f"1); 1 with a prompt that fills --seq-len, leaving no answer token (first: {path} line 2). Such rows are "
        "skipped; raise --seq-len so that their images fit (or bound them with --image-max-pixels); raise --seq-len "
        "or shorten the prompts.")


def test_eval_rows_that_are_all_skipped_are_refused_as_nothing_to_evaluate(tmp_path, tiny_model_dir, capsys):
    """Held-out rows with nothing in them name the eval data (--eval-split's share of --data, or --eval-data) and
    say there is nothing to evaluate, not that there is nothing to train."""
    from qlora.train.data.selection import hold_out

    rows = [{"instruction": f"Double {a}.", "input": "", "output": f"{2 * a}."} for a in range(6)]
    _, held = hold_out(list(range(6)), 2, 7)  # the rows --eval-split 2 --seed 7 holds out
    data = _write(tmp_path / "alpaca.jsonl", [{**r, "output": ""} if i in held else r for i, r in enumerate(rows)])
    args = ["train", "--model", str(tiny_model_dir), "--seq-len", "128", "--max-steps", "1", "--no-progress",
            "--seed", "7", "--data", str(data)]
    assert main([*args, "--output", str(tmp_path / "a"), "--eval-split", "2"]) == 2
    err = capsys.readouterr().err
    lines = ", ".join(f"{data} line {i + 1}" for i in sorted(held))
    assert (f"--eval-split 2: all 2 rows it holds out of --data {data} have nothing to evaluate: 2 with an empty "
            f"answer (first: {lines})") in err, err
    assert "nothing to train" not in err and "Traceback" not in err and "--eval-data" in err
    empty = _write(tmp_path / "eval.jsonl", [{"instruction": "Nothing.", "input": "", "output": ""}])
    assert main([*args, "--output", str(tmp_path / "b"), "--eval-data", str(empty)]) == 2
    err = capsys.readouterr().err
    assert (f"--eval-data {empty}: the one row of it has nothing to evaluate: 1 with an empty answer "
            f"(first: {empty} line 1)") in err, err
    assert "nothing to train" not in err and "Traceback" not in err
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}] * 2)
    empty_pairs = _write(tmp_path / "eval_pairs.jsonl", [{"prompt": "Q?", "chosen": "", "rejected": ""}])
    # one pair: KTO's two examples (its chosen and its rejected answer)
    for method, subject in (("dpo", "the one preference pair of it has"), ("kto", "all 2 KTO examples of it have")):
        assert main(["train", "--method", method, "--model", str(tiny_model_dir), "--seq-len", "128", "--max-steps",
                     "1", "--batch-size", "2", "--no-progress", "--data", str(pairs), "--eval-data", str(empty_pairs), "--output",
                     str(tmp_path / method)]) == 2
        err = capsys.readouterr().err
        assert f"--eval-data {empty_pairs}: {subject} nothing to evaluate" in err, err
