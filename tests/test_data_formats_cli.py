"""The new data formats end to end through `qlora train` (--data and --eval-data) and `qlora eval --data`,
and a bad row exiting 2 with its file and line, without a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path

from qlora.cli.main import main

QWEN = Path(__file__).parent / "data" / "chat_templates" / "qwen2.5.jinja"
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model, data, out, *extra) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--seq-len", "512",
                 "--max-steps", "2", "--no-progress", *extra])


def _eval(model, data, capsys, *extra) -> float:
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--data", str(data), "--seq-len", "512", *extra]) == 0
    return float(re.search(r"^loss (\S+)", capsys.readouterr().out, re.M).group(1))


def test_prompt_completion_and_mapped_fields(tmp_path, tiny_model_dir, capsys):
    plain = _jsonl(tmp_path / "pc.jsonl", [{"prompt": f"What is {a} plus {a}?", "completion": f" {2 * a}."}
                                           for a in range(6)])
    chat = _jsonl(tmp_path / "pc_chat.jsonl", [{"prompt": [{"role": "user", "content": f"Double {a}."}],
                                                "completion": [{"role": "assistant", "content": f"{2 * a}."}]}
                                               for a in range(4)])
    assert _train(tiny_model_dir, plain, tmp_path / "run", "--eval-data", str(chat)) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m["split"] == "eval" and m["loss"] > 0 for m in metrics)  # the conversational --eval-data
    qa = _jsonl(tmp_path / "qa.csv.jsonl", [{"question": "Double 3.", "answer": "6."}])
    assert _eval(tiny_model_dir, qa, capsys, "--data-fields", "instruction=question,output=answer") > 0
    assert _eval(tiny_model_dir, chat, capsys, "--adapter", str(tmp_path / "run")) > 0


def test_tool_calling_conversations(tmp_path, capsys):
    from qlora.model.tiny import build_tiny_model, train_tokenizer

    from conftest import _TEXT

    # A tiny model whose own template is Qwen2.5's (tools in the system turn): a vocabulary that knows the
    # template's words keeps a conversation with tools within the tiny model's 512 positions.
    tokenizer = train_tokenizer(_TEXT + [QWEN.read_text()] * 5, vocab_size=1000)
    tokenizer.chat_template = QWEN.read_text()
    model = Path(build_tiny_model(tmp_path / "tiny-qwen-template", tokenizer=tokenizer, arch="llama"))
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"What is {a} plus 2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": 2})}}]},
        {"role": "tool", "content": str(a + 2)},
        {"role": "assistant", "content": f"{a + 2}."}], "tools": json.dumps(TOOLS)} for a in range(4)]
    glaive = [{"conversations": [{"from": "human", "value": "What is 1 plus 2?"},
                                 {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 1, "b": 2}})},
                                 {"from": "observation", "value": "3"}, {"from": "gpt", "value": "3."}],
               "tools": TOOLS}]
    data = _jsonl(tmp_path / "tools.jsonl", rows)
    assert _train(model, data, tmp_path / "run", "--eval-data", str(_jsonl(tmp_path / "glaive.jsonl", glaive))) == 0
    assert _eval(model, data, capsys, "--adapter", str(tmp_path / "run")) > 0


def test_bad_rows_exit_2_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": "p", "completion": "c"}] * 2 + [{"prompt": "p", "completion": {"text": "c"}}]
    data = _jsonl(tmp_path / "bad.jsonl", rows)
    assert _train(tiny_model_dir, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{data} line 3: field \"completion\" must be a string or a non-empty list" in err and "Traceback" not in err
    image = _jsonl(tmp_path / "image.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "cat.png"}}]},
        {"role": "assistant", "content": "A cat."}]}])
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(image)]) == 2
    err = capsys.readouterr().err
    assert f"{image} line 1: image 'cat.png' not found" in err and "Traceback" not in err


def test_odd_json_files_exit_2_naming_file_line_and_key(tmp_path, tiny_model_dir, capsys):
    """A JSON object naming a key twice, and a .json object that reads as rows, columns or one example alike,
    stop `qlora train` before any training, in one paragraph, without a traceback."""
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": "c", "completion": "d"}\n')
    assert _train(tiny_model_dir, dup, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{dup} line 2: a JSON object names the key 'completion' twice" in err and "Traceback" not in err
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"examples": [{"prompt": "p", "completion": "c"}] * 3}))
    assert _train(tiny_model_dir, wrapped, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{wrapped}: one JSON object whose only field, 'examples', holds a list of 3" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "adapter_model.safetensors").exists()
