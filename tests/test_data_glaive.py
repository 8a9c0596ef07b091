"""glaiveai/glaive-function-calling-v2 rows (``system``, ``chat``: one transcript string each), as the dataset serves
them (row 1 of its train split, shortened), read as tool-calling conversations.

Oracles: the same conversation written as OpenAI messages with a ``tools`` column trains the same tokens; the ids are
``apply_chat_template(messages, tools=...)``'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import load_records, normalize, tokenize_dataset, tokenize_example

from trained_runs import trained_runs

QWEN = Path(__file__).parent / "data" / "chat_templates" / "qwen2.5.jinja"
NEWS = {"name": "get_news_headlines", "description": "Get the latest news headlines",
        "parameters": {"type": "object", "properties": {"country": {"type": "string", "description": "The country"}},
                       "required": ["country"]}}
AGE = {"name": "calculate_age", "description": "Calculate the age", "parameters": {"type": "object", "properties": {}}}
SYSTEM = ("SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
          + json.dumps(NEWS, indent=4) + "\n\n" + json.dumps(AGE, indent=4) + "\n")
CHAT = ('USER: Can you tell me the latest news headlines for the United States?\n\n\nASSISTANT: <functioncall> '
        '{"name": "get_news_headlines", "arguments": \'{"country": "United States"}\'} <|endoftext|>\n\n\n'
        'FUNCTION RESPONSE: {"headlines": ["Apple unveils new iPhone"]}\n\n\n'
        "ASSISTANT: Here are the latest news headlines for the United States:\n1. Apple unveils new iPhone <|endoftext|>"
        "\n\n\nUSER: That's interesting. What about France?\n\n\n"
        'ASSISTANT: <functioncall> {"name": "get_news_headlines", "arguments": {"country": "France"}} <|endoftext|>\n\n\n'
        'FUNCTION RESPONSE: {"headlines": []}\n\n\nASSISTANT: I found no headlines for France. <|endoftext|>\n\n\n')
NO_FUNCTIONS = {"system": "SYSTEM: You are a helpful assistant, with no access to external functions.\n\n",
                "chat": "USER: Hi\n\n\nASSISTANT: Hello! How can I help? <|endoftext|>\n\n\n"}


def _call(country: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_news_headlines", "arguments": {"country": country}}}]}


OPENAI = {"messages": [
    {"role": "system", "content": "You are a helpful assistant with access to the following functions. Use them if "
                                  "required."},
    {"role": "user", "content": "Can you tell me the latest news headlines for the United States?"},
    _call("United States"),
    {"role": "tool", "name": "get_news_headlines", "content": '{"headlines": ["Apple unveils new iPhone"]}'},
    {"role": "assistant", "content": "Here are the latest news headlines for the United States:\n1. Apple unveils "
                                     "new iPhone"},
    {"role": "user", "content": "That's interesting. What about France?"},
    _call("France"),
    {"role": "tool", "name": "get_news_headlines", "content": '{"headlines": []}'},
    {"role": "assistant", "content": "I found no headlines for France."}],
    "tools": [{"type": "function", "function": NEWS}, {"type": "function", "function": AGE}]}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_glaive_rows_read_as_tool_calling_conversations(tmp_path, qwen_tokenizer):
    path = _jsonl(tmp_path / "glaive.jsonl", [{"system": SYSTEM, "chat": CHAT}, NO_FUNCTIONS])
    glaive, plain = normalize(load_records(path))
    (openai,) = normalize(load_records(_jsonl(tmp_path / "openai.jsonl", [OPENAI])))
    assert glaive.messages == openai.messages and glaive.tools == openai.tools == tuple(OPENAI["tools"])
    assert plain.messages == ({"role": "system", "content": "You are a helpful assistant, with no access to external "
                                                            "functions."},
                              {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"})
    assert plain.tools is None
    fmt = ChatFormat(QWEN.read_text())
    tokenized = tokenize_example(glaive, qwen_tokenizer, fmt)
    expected = qwen_tokenizer.apply_chat_template(OPENAI["messages"], tools=OPENAI["tools"], tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert tokenized.input_ids == list(expected)
    assert (tokenized.input_ids, tokenized.labels) == (lambda t: (t.input_ids, t.labels))(
        tokenize_example(openai, qwen_tokenizer, fmt))
    runs = [qwen_tokenizer.decode(r) for r in trained_runs(tokenized.input_ids, tokenized.labels)]
    assert runs == ['<tool_call>\n{"name": "get_news_headlines", "arguments": {"country": "United States"}}\n'
                    "</tool_call><|im_end|>",
                    "Here are the latest news headlines for the United States:\n1. Apple unveils new iPhone<|im_end|>",
                    '<tool_call>\n{"name": "get_news_headlines", "arguments": {"country": "France"}}\n</tool_call>'
                    "<|im_end|>", "I found no headlines for France.<|im_end|>"]  # never <|endoftext|> nor a result


def test_glaive_empty_answers_are_skipped_and_bad_calls_refused(tmp_path, qwen_tokenizer):
    empty = {"system": NO_FUNCTIONS["system"], "chat": "USER: Hi\n\n\nASSISTANT: <|endoftext|>\n\n\n"}
    path = _jsonl(tmp_path / "glaive.jsonl", [NO_FUNCTIONS, empty, {"system": "", "chat": ""}])
    _, report = tokenize_dataset(normalize(load_records(path)), qwen_tokenizer, ChatFormat(QWEN.read_text()))
    assert report.empty == {"an empty answer": [f"{path} line 2"], "no messages": [f"{path} line 3"]}
    bad = {"system": SYSTEM, "chat": CHAT.replace("'{\"country\": \"United States\"}'}", "{country: US}")}
    path = _jsonl(tmp_path / "bad.jsonl", [NO_FUNCTIONS, bad])
    with pytest.raises(UsageError, match=rf"^{path} line 2, turn 1: the <functioncall> is not a JSON object nor "):
        normalize(load_records(path))
    broken = {"system": SYSTEM.replace('"name": "calculate_age"', "name: calculate_age"), "chat": CHAT}
    with pytest.raises(UsageError, match=rf"^{tmp_path / 'broken.jsonl'} line 1: the function definitions in the system "
                                         "prompt are not JSON objects"):
        normalize(load_records(_jsonl(tmp_path / "broken.jsonl", [broken])))


def test_cli_trains_glaive_rows(tmp_path, capsys):
    from qlora.model.tiny import build_tiny_model, train_tokenizer

    from conftest import _TEXT

    tokenizer = train_tokenizer(_TEXT + [QWEN.read_text()] * 5, vocab_size=1000)
    tokenizer.chat_template = QWEN.read_text()
    model = build_tiny_model(tmp_path / "tiny-qwen-template", tokenizer=tokenizer, arch="llama")
    one_call = {"system": SYSTEM.split("\n\n{")[0], "chat": (  # within the tiny model's 512 positions
        'USER: News of France?\n\n\nASSISTANT: <functioncall> {"name": "get_news_headlines", "arguments": '
        '\'{"country": "France"}\'} <|endoftext|>\n\n\nFUNCTION RESPONSE: {"headlines": []}\n\n\n'
        "ASSISTANT: I found none. <|endoftext|>")}
    data = _jsonl(tmp_path / "glaive.jsonl", [one_call, NO_FUNCTIONS])
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--seq-len", "512", "--max-steps", "1", "--no-progress"]) == 0
    assert "data: 2 examples, 0 truncated to --seq-len; 2 examples" in "".join(capsys.readouterr())


# glaiveai/glaive-function-calling (v1): one "sample" column holding the whole transcript, the system prompt first,
# in the layout its dataset card gives ("SYSTEM: ... you can use the functions if needed-" and the definitions, then
# "USER:", "ASSISTANT:", "<functioncall> {json function call}", "FUNCTION RESPONSE:" turns).
V1_SYSTEM = ("SYSTEM: You are an helpful assistant who has access to the following functions to help the user, you can "
             "use the functions if needed-\n" + json.dumps(NEWS, indent=2) + "\n" + json.dumps(AGE, indent=2) + "\n")


def test_glaive_v1_sample_rows_read_as_v2_rows(tmp_path, qwen_tokenizer):
    """A v1 row is the v2 row of the same conversation: the same messages and tools (the system prompt's
    definitions), so it trains the same tokens; a row with no functions has a system prompt only."""
    multiline = CHAT.replace("'{\"country\": \"United States\"}'", "'{\n  \"country\": \"United States\"\n}'")
    assert multiline != CHAT  # a call's quoted arguments over several lines, as the v1 model card writes them
    v1 = [{"sample": V1_SYSTEM + "\n\n" + multiline}, {"sample": NO_FUNCTIONS["system"] + NO_FUNCTIONS["chat"]},
          {"sample": "USER: Hi\n\n\nASSISTANT: Hello! How can I help? <|endoftext|>"}]
    v2 = [{"system": V1_SYSTEM, "chat": CHAT}, NO_FUNCTIONS, {"system": "", "chat": v1[2]["sample"]}]
    read_v1 = normalize(load_records(_jsonl(tmp_path / "v1.jsonl", v1)))
    read_v2 = normalize(load_records(_jsonl(tmp_path / "v2.jsonl", v2)))
    for a, b in zip(read_v1, read_v2, strict=True):
        assert (a.messages, a.tools) == (b.messages, b.tools)
    calls, plain, bare = read_v1
    assert calls.messages[0] == {"role": "system", "content": "You are an helpful assistant who has access to the "
                                 "following functions to help the user, you can use the functions if needed."}
    assert list(calls.messages[1:]) == OPENAI["messages"][1:] and calls.tools == tuple(OPENAI["tools"])
    assert plain.messages[0]["role"] == "system" and plain.tools is None and bare.messages[0]["role"] == "user"
    fmt = ChatFormat(QWEN.read_text())
    assert tokenize_example(calls, qwen_tokenizer, fmt).input_ids == list(qwen_tokenizer.apply_chat_template(
        [calls.messages[0]] + OPENAI["messages"][1:], tools=OPENAI["tools"], tokenize=True,
        return_dict=True)["input_ids"])
    empty = _jsonl(tmp_path / "empty.jsonl", [v1[1], {"sample": ""}])
    _, report = tokenize_dataset(normalize(load_records(empty)), qwen_tokenizer, fmt)
    assert report.empty == {"no messages": [f"{empty} line 2"]}
    broken = _jsonl(tmp_path / "broken.jsonl", [{"sample": "The assistant said hello.\n\nUSER: Hi"}])
    with pytest.raises(UsageError, match=rf'^{broken} line 1: the "sample" transcript must start with "SYSTEM:"'):
        normalize(load_records(broken), "chat")
