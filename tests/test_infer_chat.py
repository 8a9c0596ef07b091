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


def _chat(tiny_model_dir, db, *extra: str, stdin: str, **kwargs) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "qlora", "chat", "--model", str(tiny_model_dir), "--temperature", "0",
            "--max-new-tokens", "4", "--quant", "none", "--compute-dtype", "fp32", "--db", str(db), *extra]
    return subprocess.run(args, input=stdin, env=ENV, capture_output=True, text=True, timeout=180, **kwargs)


@pytest.mark.slow
def test_read_only_database_serves_history_and_saves_nothing(tiny_model_dir, tmp_path):
    from test_infer_store import _stored, _without_root_override

    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "chats.sqlite"
    _stored(db, turns=2)
    before = db.read_bytes()
    db.chmod(0o444)
    try:
        out = _chat(tiny_model_dir, db, "--session", "s", stdin="/history\nnew question\nanother\n/history\n",
                    preexec_fn=_without_root_override)
        refused = _chat(tiny_model_dir, db, "--session", "brand new", stdin="hi\n", preexec_fn=_without_root_override)
    finally:
        db.chmod(0o644)
    assert out.returncode == 0, out.stderr
    assert "is read-only: the session can be read, new turns will not be saved" in out.stderr
    assert out.stdout.count("you: old question 1") == 2 and "you: new question" not in out.stdout
    assert out.stderr.count("(turn not saved:") == 2 and out.stdout.count("assistant> ") == 2
    assert "Traceback" not in out.stderr
    assert refused.returncode == 2 and "session 'brand new' does not exist" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert db.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["chats.sqlite"]


@pytest.mark.slow
def test_read_only_folder_is_a_clear_error(tiny_model_dir, tmp_path):
    from test_infer_store import _without_root_override

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        out = _chat(tiny_model_dir, folder / "chats.sqlite", "--session", "s", stdin="hi\n",
                    preexec_fn=_without_root_override)
    finally:
        folder.chmod(0o755)
    assert out.returncode == 2 and "is read-only; pass --db a file in a folder you can write" in out.stderr
    assert "Traceback" not in out.stderr and list(folder.iterdir()) == []


@pytest.mark.slow
def test_lock_held_at_start_reports_unsaved_turns_and_the_chat_goes_on(tiny_model_dir, tmp_path):
    from test_infer_store import Locker, _stored

    db = tmp_path / "chats.sqlite"
    _stored(db)
    locker = Locker(db)
    try:
        out = _chat(tiny_model_dir, db, "--session", "s", "--db-timeout", "0.3",
                    stdin="first\nsecond\n/history\n")
        new = _chat(tiny_model_dir, db, "--session", "other", "--db-timeout", "0.3", stdin="hi\n")
    finally:
        locker.release()
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("(turn not saved: database locked by another program; the chat goes on)") == 2
    assert out.stdout.count("assistant> ") == 2 and "you: old question 0" in out.stdout  # all piped input ran
    assert "Traceback" not in out.stderr
    assert new.returncode == 2 and "locked by another program" in new.stderr and "Traceback" not in new.stderr
    from qlora.infer.store import ChatStore

    store = ChatStore(db)
    assert [m.content for m in store.session("s", "buffer").messages()] == ["old question 0", "old answer 0"]
    assert store.sessions() == ["s"]


@pytest.mark.slow
def test_lock_taken_mid_session_loses_only_that_turn(tiny_model_dir, tmp_path):
    from test_infer_store import Locker

    from qlora.infer.store import ChatStore

    db = tmp_path / "chats.sqlite"
    child = pexpect.spawn(sys.executable, ["-m", "qlora", "chat", "--model", str(tiny_model_dir), "--temperature", "0",
                                           "--max-new-tokens", "4", "--quant", "none", "--compute-dtype", "fp32",
                                           "--session", "s", "--db", str(db), "--db-timeout", "0.3"],
                          env=ENV, encoding="utf-8", timeout=60)
    child.expect("you> ")
    child.sendline("saved before")
    child.expect("you> ")
    locker = Locker(db)
    try:
        child.sendline("during the lock")
        child.expect(r"turn not saved: database locked by another program")
        child.expect("you> ")
    finally:
        locker.release()
    child.sendline("saved after")
    child.expect("you> ")
    child.sendline("/history")
    child.expect("you: saved after")
    child.expect("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    users = [m.content for m in ChatStore(db).session("s", "buffer").messages() if m.role == "user"]
    assert users == ["saved before", "saved after"]


@pytest.mark.slow
def test_vector_session_with_another_embedder_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    from qlora.infer.store import ChatStore

    db = tmp_path / "chats.sqlite"
    store = ChatStore(db)
    session = store.session("v", "vector")
    last = session.add_messages([Message("user", "hi"), Message("assistant", "hello")])
    session.add_vector("input: hi\noutput: hello", [1.0, 0.0, 0.0], last, "model:/some/other/model")
    store.close()
    other = _chat("no-such-model", db, "--session", "v", "--memory", "vector", stdin="hi\n")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "made by embedder model:/some/other/model (width 3)" in other.stderr  # not "no such model": checked first
    store = ChatStore(db)  # same name, other width: found once the model is loaded
    store.conn.execute("UPDATE sessions SET embedder = ?", (f"model:{Path(tiny_model_dir).resolve()}",))
    store.close()
    wider = _chat(tiny_model_dir, db, "--session", "v", "--memory", "vector", stdin="hi\n")
    assert wider.returncode == 2 and "(width 3), but this run embeds with" in wider.stderr
    assert "Traceback" not in wider.stderr


def test_embedder_problems_fail_before_the_model_loads(tmp_path):
    import importlib.util

    out = _chat("no-such-model", tmp_path / "c.sqlite", "--memory", "vector", "--embedder",
                "someone/some-embedder", stdin="hi\n", )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    if importlib.util.find_spec("sentence_transformers") is None:
        assert "pip install sentence-transformers" in out.stderr
    else:  # HF_HUB_OFFLINE is set for the tests: an uncached hub id fails at once
        assert "someone/some-embedder is not in the Hugging Face cache" in out.stderr


@pytest.mark.slow
def test_resume_derives_what_a_killed_run_saved(tiny_model_dir, tmp_path):
    """The state kill -9 leaves between an exchange's commit and its vector's: resuming embeds it."""
    from qlora.infer.store import ChatStore

    db = tmp_path / "chats.sqlite"
    store = ChatStore(db)
    store.session("v", "vector").add_messages([Message("user", "where is my cat"), Message("assistant", "on the mat")])
    store.close()
    out = _chat(tiny_model_dir, db, "--session", "v", "--memory", "vector", stdin="/memory\n")
    assert out.returncode == 0, out.stderr
    assert "input: where is my cat\noutput: on the mat" in out.stdout
    store = ChatStore(db)
    session = store.session("v", "vector")
    from transformers import AutoConfig

    width = AutoConfig.from_pretrained(tiny_model_dir).hidden_size
    assert len(session.vectors()) == 1 and session.embedder() == (f"model:{Path(tiny_model_dir).resolve()}", width)
