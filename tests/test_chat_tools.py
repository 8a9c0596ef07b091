"""Tool calls in ``qlora chat`` and :class:`~qlora.infer.chat.Chat`, with a model trained to call a tool.

Oracle: the conversation the model was trained on (tests/tool_model.py): asked ASK it calls get_weather
with {"city": "Paris"}; given RESULT it answers ANSWER. The memory keeps the whole exchange (the user's text,
the call, the result and the final answer) and replays it, through a stored session too; the chat template's
rendering of that history is the oracle for what the next turn sees.
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
    with pytest.raises(UsageError, match="1 tool calls are waiting for results, got 0"):
        chat.send_tool_results([])
    assert "".join(chat.send_tool_results([RESULT])) == ANSWER
    assert chat.pending_calls == [] and chat.last_reply == ANSWER
    assert chat.memory.session.messages() == _exchange(call_id)


def _exchange(call_id: str) -> list[Message]:
    """The trained conversation as the memory must keep it."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return [Message("user", ASK["content"]), Message("assistant", "", (call,)),
            Message("tool", RESULT, tool_call_id=call_id), Message("assistant", ANSWER)]


@pytest.mark.parametrize("memory", ["buffer", "window", "token"])
def test_tool_turns_are_remembered_and_replayed_through_a_stored_session(tool_model_dir, tmp_path, memory):
    from qlora.infer.memory import (ConversationBufferMemory, ConversationBufferWindowMemory,
                                    ConversationTokenBufferMemory)
    from qlora.infer.store import ChatStore
    from qlora.infer.template import render_chat

    model, tokenizer = qlora.load_model(tool_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    build = {"buffer": lambda s: ConversationBufferMemory(session=s, return_messages=True),
             "window": lambda s: ConversationBufferWindowMemory(k=1, session=s, return_messages=True),
             "token": lambda s: ConversationTokenBufferMemory(tokenizer, 400, session=s, return_messages=True)}[memory]
    store = ChatStore(tmp_path / "chat.sqlite")
    chat = Chat(model, tokenizer, memory=build(store.session("s", memory)), tools=TOOLS, temperature=0.0,
                max_new_tokens=80)
    "".join(chat.send(ASK["content"]))
    ((call_id, _),) = chat.pending_calls
    assert "".join(chat.send_tool_results([RESULT])) == ANSWER
    store.close()

    store = ChatStore(tmp_path / "chat.sqlite")  # a later run resumes the session
    resumed = Chat(model, tokenizer, memory=build(store.session("s", memory)), tools=TOOLS, temperature=0.0,
                   max_new_tokens=80)
    assert resumed.memory.session.messages() == _exchange(call_id)
    prompt = resumed.prompt_messages("Thanks!")
    assert prompt == [*_exchange(call_id), Message("user", "Thanks!")]  # the call and result are replayed
    history = [{"role": "user", "content": ASK["content"]},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": RESULT, "tool_call_id": call_id},
               {"role": "assistant", "content": ANSWER}, {"role": "user", "content": "Thanks!"}]
    rendered = render_chat(tokenizer, prompt, tools=TOOLS)
    assert rendered == tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert RESULT in rendered
    store.close()


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
    child.expect_exact('assistant: (tool call: get_weather {"city": "Paris"})')
    child.expect_exact(f'Tool: {RESULT}')
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
    assert main(["chat", "--model", "never-loaded", "--tools", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--tools {path}" in err and message in err
