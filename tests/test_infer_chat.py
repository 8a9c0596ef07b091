"""Chat: prompt layout with memory, and the ``qlora chat``/``generate`` commands in a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from qlora.infer.chat import Chat
from qlora.infer.memory import ConversationBufferWindowMemory, ConversationSummaryMemory
from qlora.infer.messages import Message

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_chat_streams_and_remembers(lm):
    model, tok = lm
    chat = Chat(model, tok, memory=ConversationBufferWindowMemory(k=1, return_messages=True), system="Be brief.",
                temperature=0, max_new_tokens=8)
    first = "".join(chat.send("Hello"))
    chat.send("unused")  # a generator: nothing happens until it is consumed
    assert chat.memory.session.messages() == [Message("user", "Hello"), Message("assistant", first.strip())]
    "".join(chat.send("Again"))
    prompt = chat.prompt_messages("Third")
    assert prompt[0] == Message("system", "Be brief.")
    assert [m.content for m in prompt[1:]] == ["Again", chat.memory.session.messages()[-1].content, "Third"]


class _Summary:
    def complete(self, prompt: str, **options) -> str:
        return "The human said hello."


def test_string_history_goes_to_the_system_message(lm):
    model, tok = lm
    chat = Chat(model, tok, memory=ConversationSummaryMemory(_Summary()), temperature=0, max_new_tokens=4)
    "".join(chat.send("hello"))
    prompt = chat.prompt_messages("next")
    assert prompt[0].role == "system" and prompt[0].content.endswith("The human said hello.")
    assert prompt[1:] == [Message("user", "next")]


def _spawn(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "qlora", *args], env=ENV, encoding="utf-8", timeout=60)


def test_chat_command_turns_reset_and_resume(tiny_model_dir, tmp_path):
    db = tmp_path / "chats.sqlite"
    args = ["chat", "--model", str(tiny_model_dir), "--temperature", "0", "--max-new-tokens", "6",
            "--quant", "none", "--compute-dtype", "fp32",
            "--memory", "window", "--k", "2", "--session", "demo", "--db", str(db)]
    child = _spawn(*args)
    child.expect("you> ")
    for text in ("hello there", "second turn"):
        child.sendline(text)
        child.expect("assistant> ")
        child.expect("you> ")
    child.sendline("/history")
    child.expect("you: hello there")
    child.expect("you: second turn")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect(r"\(conversation cleared\)")
    child.sendline("/history")
    child.expect(r"\(no messages\)")
    child.sendline("remember me")
    child.expect("assistant> ")
    child.expect("you> ")
    child.sendline("/memory")
    child.expect("Human: remember me")
    child.expect("you> ")
    child.sendline("/save")
    child.expect("saved in")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = _spawn(*args)
    child.expect(r"resumed session 'demo': 2 messages")
    child.expect("you> ")
    child.sendline("/history")
    child.expect("you: remember me")
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_generate_command_streams_the_greedy_continuation(lm, tiny_model_dir):
    from qlora.infer.generate import SamplingOptions, stream_text

    model, tok = lm
    expected = "".join(stream_text(model, tok, "The quick", SamplingOptions(max_new_tokens=12, temperature=0)))
    out = subprocess.run([sys.executable, "-m", "qlora", "generate", "--model", str(tiny_model_dir), "--prompt",
                          "The quick", "--temperature", "0", "--max-new-tokens", "12",
                          "--quant", "none", "--compute-dtype", "fp32"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"


def test_bad_model_path_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "qlora", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
