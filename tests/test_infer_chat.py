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


# Llama-2's template in substance: an optional system message folded into the first user turn, then strict
# user/assistant alternation, enforced with raise_exception as the real one does.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content + ' [/INST]' }}{% else %}{{ ' ' + content + ' </s>' }}{% endif %}"
    "{% endfor %}"
)
# Gemma's: no system role at all, strict alternation.
GEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>assistant\\n' }}{% endif %}"
)


class _Bookkeeper:
    """A deterministic LLM for the memories' own calls: entities, facts, summaries."""

    def complete(self, prompt: str, **options) -> str:
        if "knowledge triples" in prompt:
            return "(Alice, likes, tea)"
        if "proper nouns" in prompt:
            return "Alice"
        return "A summary of the talk so far."


class _Words:
    name, dim = "words", 3

    def __call__(self, texts):
        import torch

        rows = torch.tensor([[len(t), t.count("a") + 1.0, t.count("e") + 1.0] for t in texts])
        return torch.nn.functional.normalize(rows, dim=-1)


def _memory(kind: str, tokenizer):
    from qlora.infer import memory as m

    llm = _Bookkeeper()
    common = dict(return_messages=True)
    return {
        "buffer": lambda: m.ConversationBufferMemory(**common),
        "window": lambda: m.ConversationBufferWindowMemory(k=2, **common),
        "token": lambda: m.ConversationTokenBufferMemory(tokenizer, max_token_limit=120, **common),
        "summary": lambda: m.ConversationSummaryMemory(llm, **common),
        "summary-buffer": lambda: m.ConversationSummaryBufferMemory(llm, tokenizer, max_token_limit=120, **common),
        "entity": lambda: m.ConversationEntityMemory(llm, k=2, **common),
        "kg": lambda: m.ConversationKGMemory(llm, k=2, **common),
        "vector": lambda: m.VectorStoreRetrieverMemory(_Words(), k=3, **common),
    }[kind]()


@pytest.mark.parametrize("template", ["llama2", "gemma"])
@pytest.mark.parametrize("kind", ["buffer", "window", "token", "summary", "summary-buffer", "entity", "kg", "vector"])
def test_strict_alternation_templates_accept_every_memory_for_12_turns(lm, kind, template):
    import copy

    from qlora.infer.template import render_chat

    model, tok = lm
    tok = copy.deepcopy(tok)
    tok.chat_template = LLAMA2_TEMPLATE if template == "llama2" else GEMMA_TEMPLATE
    chat = Chat(model, tok, memory=_memory(kind, tok), system="Be brief.", temperature=0, max_new_tokens=5)
    for turn in range(12):
        text = f"Alice says turn {turn}" + " and more words" * (turn % 4)
        prompt = chat.prompt_messages(text)
        turns = [m.role for m in prompt if m.role != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2) + ["user"], (turn, turns)
        rendered = render_chat(tok, prompt)  # raises on a broken alternation
        assert "Be brief." in rendered and text in rendered
        "".join(chat.send(text))
    assert len(chat.memory.session.messages()) == 24
    if kind in ("window", "token", "summary-buffer"):  # pruning happened, and at exchange boundaries
        assert 0 < len(chat.memory.buffer()) < 22


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
