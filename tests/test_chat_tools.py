"""Tool calls in ``qlora chat`` and :class:`~qlora.infer.chat.Chat`, with a model trained to call a tool.

Oracle: the conversation the model was trained on (tests/tool_model.py): asked ASK it calls get_weather
with {"city": "Paris"}; given RESULT it answers ANSWER. The memory keeps the user's text and the final answer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.infer.chat import Chat
from qlora.infer.messages import Message

from tool_model import ANSWER, ASK, RESULT, TOOLS

SRC = str(Path(qlora.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "OMP_NUM_THREADS": "1"}


def test_chat_calls_the_tool_then_answers_with_its_result(tool_model_dir):
    model, tokenizer = qlora.load_model(tool_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    chat = Chat(model, tokenizer, tools=TOOLS, temperature=0.0, max_new_tokens=80)
    assert "".join(chat.send(ASK["content"])) == ""  # the call markup is not shown as text
    ((call_id, call),) = chat.pending_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call_id.startswith("call_") and chat.last_reply is None
    assert chat.memory.session.messages() == []  # the turn is not over yet
    with pytest.raises(ValueError):
        chat.send_tool_results([])
    assert "".join(chat.send_tool_results([RESULT])) == ANSWER
    assert chat.pending_calls == [] and chat.last_reply == ANSWER
    assert chat.memory.session.messages() == [Message("user", ASK["content"]), Message("assistant", ANSWER)]


def test_chat_refuses_tools_for_a_template_that_cannot_show_them(tiny_model_dir):
    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="does not render tools"):
        Chat(model, tokenizer, tools=TOOLS)


def test_chat_command_asks_for_the_tool_result(tool_model_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    child = pexpect.spawn(sys.executable, ["-m", "qlora", "chat", "--model", str(tool_model_dir), "--tools",
                                           str(tools), "--temperature", "0", "--max-new-tokens", "80",
                                           "--quant", "none", "--compute-dtype", "fp32"],
                          env=ENV, encoding="utf-8", timeout=60)
    child.expect("you> ")
    child.sendline(ASK["content"])
    child.expect_exact('(tool call: get_weather {"city": "Paris"})')
    child.expect_exact("get_weather result> ")
    child.sendline(RESULT)
    child.expect_exact(f"assistant> {ANSWER}")
    child.expect("you> ")
    child.sendline("/history")
    child.expect_exact(f"assistant: {ANSWER}")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("content, message", [
    ("{oops", "not valid JSON"),
    ('{"type": "function"}', "expected a non-empty JSON list"),
    ('[{"type": "function", "function": {"name": "a b"}}]', "tools.0.function.name"),
])
def test_bad_tools_file_is_one_paragraph_naming_it(tmp_path, capsys, content, message):
    from qlora.cli.main import main

    path = tmp_path / "tools.json"
    path.write_text(content)
    assert main(["chat", "--model", str(tmp_path / "never-loaded"), "--tools", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--tools {path}" in err and message in err
