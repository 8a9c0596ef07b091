"""SQLite chat store: round trips across processes, concurrent writers, damaged and foreign files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from array import array
from pathlib import Path

import pytest

from qlora.errors import UsageError
from qlora.infer.messages import Message
from qlora.infer.store import SCHEMA_VERSION, ChatStore


SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": SRC})


def test_round_trip_across_processes(tmp_path):
    db = tmp_path / "chats.sqlite"
    writer = _python("""
        import sys
        from qlora.infer.messages import Message
        from qlora.infer.store import ChatStore
        s = ChatStore(sys.argv[1]).session("alice", "kg")
        last = s.add_messages([Message("user", "hi"), Message("assistant", "hello")])
        assert last == 2
        s.set_summary("greeting", last)
        s.set_entities({"Alice": "a person"}, last)
        s.add_triples([("Alice", "likes", "tea"), ("Alice", "likes", "tea")], last)
        s.add_vector("input: hi", [0.5, -1.0, 2.0], last, "bag")
    """, str(db))
    assert writer.wait() == 0, writer.stderr.read()
    store = ChatStore(db)
    s = store.session("alice", "kg")
    assert s.messages() == [Message("user", "hi"), Message("assistant", "hello")]
    assert s.summary() == ("greeting", 2)
    assert s.entities() == {"Alice": "a person"}
    assert s.triples() == [("Alice", "likes", "tea")]
    assert [(i, t, array("f", v).tolist()) for i, t, v in s.vectors()] == [(1, "input: hi", [0.5, -1.0, 2.0])]
    assert s.embedder() == ("bag", 3)
    assert s.entries() == [(1, Message("user", "hi")), (2, Message("assistant", "hello"))]
    assert not s.set_entities({"Alice": "likes tea"}, 2)  # that exchange was already derived from
    assert s.entities() == {"Alice": "a person"}
    third = s.add_messages([Message("user", "Alice likes coffee"), Message("assistant", "ok")])
    assert s.set_entities({"Alice": "likes coffee"}, third) and s.entities() == {"Alice": "likes coffee"}
    assert s.add_triples([("alice", "drinks", "Tea")], third)  # same subject and object: replaces
    assert s.triples() == [("alice", "drinks", "Tea")] and s.progress("triples") == third
    other = store.session("bob", "kg")
    assert other.messages() == [] and store.sessions() == ["alice", "bob"]
    s.clear()
    assert s.messages() == [] and s.summary() == ("", 0) and s.triples() == [] and s.vectors() == []
    assert s.embedder() is None and s.progress("triples") == 0
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_concurrent_writers_lose_nothing(tmp_path):
    db = tmp_path / "chats.sqlite"
    code = """
        import sys
        from qlora.infer.messages import Message
        from qlora.infer.store import ChatStore
        store = ChatStore(sys.argv[1])
        for i in range(40):
            store.session(sys.argv[2], "buffer").add_messages([Message("user", f"{sys.argv[2]}-{i}"), Message("assistant", "ok")])
    """
    writers = [_python(code, str(db), name) for name in ("shared", "shared", "own")]
    for w in writers:
        assert w.wait() == 0, w.stderr.read()
    store = ChatStore(db)
    assert len(store.session("shared", "buffer").messages()) == 160
    assert len(store.session("own", "buffer").messages()) == 80
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_resuming_with_another_memory_kind_is_refused(tmp_path):
    ChatStore(tmp_path / "c.sqlite").session("s", "buffer")
    with pytest.raises(UsageError, match="--memory buffer"):
        ChatStore(tmp_path / "c.sqlite").session("s", "summary")


def test_non_sqlite_file_is_reported(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 200)
    with pytest.raises(UsageError, match="not a usable qlora chat database"):
        ChatStore(path)
    assert path.read_text().startswith("these are my notes")


def test_foreign_database_is_reported_and_left_alone(tmp_path):
    path = tmp_path / "app.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(UsageError, match="another program"):
        ChatStore(path)
    assert sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]


def test_newer_schema_is_reported(tmp_path):
    path = tmp_path / "c.sqlite"
    ChatStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(UsageError, match="newer"):
        ChatStore(path)


def test_damaged_database_is_reported(tmp_path):
    path = tmp_path / "c.sqlite"
    store = ChatStore(path)
    session = store.session("s", "buffer")
    session.add_messages([Message("user", "x" * 3000)] * 20)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    data[4096 * 2: 4096 * 4] = b"\xff" * 8192  # overwrite two pages in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged"):
        ChatStore(path)


# Memories that derive state from exchanges, driven by deterministic stand-ins so that what each exchange
# must leave behind is known. Run in a child process (killed) and in the test (resumed).
_MEMORIES = '''
import numpy as np

from qlora.infer import memory as m


class Bookkeeper:
    def complete(self, prompt, **options):
        last = prompt.rsplit("Human: ", 1)[-1].split("\\n")[0]  # the line being processed
        word = last.split()[0] if last.split() else "x"
        if "knowledge triples" in prompt:
            return f"({word}, said, {last})"
        if "proper nouns" in prompt:
            return word
        if "Progressively summarize" in prompt:
            old = prompt.split("Current summary:\\n")[-1].split("\\n\\nNew lines")[0]
            new = [line[7:] for line in prompt.split("New lines of conversation:\\n")[-1].split("\\n")
                   if line.startswith("Human: ")]
            return " | ".join(filter(None, [old, *new]))
        return f"{word} was mentioned"


class Letters:
    name, dim = "letters", 26

    def __call__(self, texts):
        rows = np.array([[t.lower().count(chr(97 + i)) + 0.5 for i in range(26)] for t in texts], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def build(kind, session):
    llm = Bookkeeper()
    return {"summary": lambda: m.ConversationSummaryMemory(llm, session=session),
            "summary-buffer": lambda: m.ConversationSummaryBufferMemory(llm, TOKENIZER, max_token_limit=12,
                                                                        session=session),
            "entity": lambda: m.ConversationEntityMemory(llm, session=session),
            "kg": lambda: m.ConversationKGMemory(llm, session=session),
            "vector": lambda: m.VectorStoreRetrieverMemory(Letters(), session=session)}[kind]()


class WordTokenizer:  # one token per word: enough to count
    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": text.split()})


TOKENIZER = WordTokenizer()
TURNS = [("Alice likes green tea", "noted"), ("Bob plays the mandolin", "nice"), ("Carol lives in Oslo", "cold")]
'''

_CRASH_CHILD = '''
import os, signal, sys
from contextlib import contextmanager

from qlora.infer.store import ChatStore

db, kind, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])


class KilledAfterCommit(ChatStore):
    """SIGKILLs this process right after its kill_after-th committed transaction."""
    commits = 0

    @contextmanager
    def transaction(self):
        with super().transaction() as conn:
            yield conn
        KilledAfterCommit.commits += 1
        if KilledAfterCommit.commits == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)


memory = build(kind, KilledAfterCommit(db).session("s", kind))
for user, reply in TURNS[:2]:
    memory.load_memory_variables({"input": user})
    memory.save_context({"input": user}, {"output": reply})
print("commits", KilledAfterCommit.commits)
'''


def _check_derived(kind: str, memory, turns) -> None:
    """Every exchange in the session has everything it derives, exactly once."""
    users = [m.content for m in memory.session.messages() if m.role == "user"]
    assert users == [u for u, _ in turns]
    last = memory.session.entries()[-1][0]
    if kind == "summary":
        assert memory.session.summary() == (" | ".join(users), last)
    elif kind == "summary-buffer":
        summary, covered = memory.session.summary()
        kept = [m.content for m in memory.buffer() if m.role == "user"]
        assert [u for u in summary.split(" | ") if u] + kept == users and memory.num_tokens(memory.buffer()) <= 12
    elif kind == "entity":
        assert memory.session.entities() == {u.split()[0]: f"{u.split()[0]} was mentioned" for u in users}
        assert memory.session.progress("entities") == last
    elif kind == "kg":
        assert memory.session.triples() == [(u.split()[0], "said", u) for u in users]
    else:
        assert [text for _, text, _ in memory.session.vectors()] == [f"input: {u}\noutput: {r}" for u, r in turns]
        assert memory.session.embedder() == ("letters", 26)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["summary", "summary-buffer", "entity", "kg", "vector"])
def test_kill_9_at_every_commit_then_resume_keeps_every_derived_record(tmp_path, kind):
    from qlora.infer.memory.base import exchanges

    namespace: dict = {}
    exec(_MEMORIES, namespace)
    total = None
    kill_after = 1
    while total is None or kill_after <= total:
        db = tmp_path / f"{kind}-{kill_after}.sqlite"
        child = subprocess.run([sys.executable, "-c", _MEMORIES + _CRASH_CHILD, str(db), kind, str(kill_after)],
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC}, timeout=60)
        if child.returncode == 0:  # ran to the end: now we know how many commit points there are
            total = int(child.stdout.split()[-1])
            break
        assert child.returncode == -9, child.stderr
        store = ChatStore(db)
        resumed = namespace["build"](kind, store.session("s", kind))
        resumed.catch_up()  # what qlora chat does on resume
        saved = [(e.user.content, e.reply.content) for e in exchanges(resumed.session.entries())]
        assert saved == namespace["TURNS"][:len(saved)]
        if saved:
            _check_derived(kind, resumed, saved)
            user, reply = namespace["TURNS"][2]  # and the conversation goes on normally
            resumed.load_memory_variables({"input": user})
            resumed.save_context({"input": user}, {"output": reply})
            _check_derived(kind, resumed, saved + [(user, reply)])
        store.close()
        kill_after += 1
    assert total is not None and total >= 3  # the session, then each exchange and what it derives


_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[2] == "readers-too":
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


class Locker:
    """Another program holding the database's lock until :meth:`release`."""

    def __init__(self, db: Path, mode: str = "writers") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(db), mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0


def _stored(db: Path, name: str = "s", turns: int = 1) -> None:
    store = ChatStore(db)
    session = store.session(name, "buffer")
    for i in range(turns):
        session.add_messages([Message("user", f"old question {i}"), Message("assistant", f"old answer {i}")])
    store.close()


def test_lock_held_by_another_program_is_reported_as_locked(tmp_path):
    from qlora.infer.store import StoreLocked

    db = tmp_path / "c.sqlite"
    _stored(db)
    locker = Locker(db)
    try:
        store = ChatStore(db, timeout=0.2)  # reading needs no lock: an existing session opens
        session = store.session("s", "buffer")
        assert session.messages()[0] == Message("user", "old question 0")
        with pytest.raises(StoreLocked, match="database locked by another program"):
            session.add_messages([Message("user", "new"), Message("assistant", "lost")])
        with pytest.raises(StoreLocked):
            store.session("new session", "buffer")  # creating one must write
        store.close()
    finally:
        locker.release()
    locker = Locker(db, "readers-too")  # a program that locks readers out too
    try:
        with pytest.raises(StoreLocked, match="locked by another program"):
            ChatStore(db, timeout=0.2)
    finally:
        locker.release()
    store = ChatStore(db)
    assert [m.content for m in store.session("s", "buffer").messages()] == ["old question 0", "old answer 0"]
    assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _without_root_override() -> None:
    """As root, drop CAP_DAC_OVERRIDE from the child so file permission bits apply to it
    as to any user (root can otherwise write a 0444 file); elsewhere nothing to do."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


_READ_ONLY_CHILD = """
import sys
from qlora.errors import UsageError
from qlora.infer.messages import Message
from qlora.infer.store import ChatStore, StoreReadOnly
db = sys.argv[1]
store = ChatStore(db)
assert store.read_only
session = store.session("s", "buffer")
print([m.content for m in session.messages()])
try:
    session.add_messages([Message("user", "new"), Message("assistant", "x")])
except StoreReadOnly as exc:
    print("write refused:", exc)
try:
    store.session("other", "buffer")
except StoreReadOnly as exc:
    print("create refused:", exc)
store.close()
"""


@pytest.mark.parametrize("what", ["file", "folder"])
def test_read_only_store_opens_for_reading_and_refuses_writes(tmp_path, what):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "c.sqlite"
    _stored(db)
    before = db.read_bytes()
    (db if what == "file" else folder).chmod(0o444 if what == "file" else 0o555)
    tmp_path.chmod(0o755)
    try:
        out = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD, str(db)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": SRC}, preexec_fn=_without_root_override, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "['old question 0', 'old answer 0']" in out.stdout
        assert f"write refused: {db} is read-only" in out.stdout
        assert "create refused: session 'other' does not exist" in out.stdout and "read-only" in out.stdout
        new = subprocess.run([sys.executable, "-c", "import sys; from qlora.infer.store import ChatStore; "
                              "ChatStore(sys.argv[1])", str(folder / "new.sqlite")], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": SRC}, preexec_fn=_without_root_override, timeout=60)
        if what == "folder":
            assert "StoreReadOnly" in new.stderr and "is read-only; pass --db a file in a folder you can write" in new.stderr
        else:
            assert new.returncode == 0, new.stderr
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    assert db.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(["c.sqlite"] + (["new.sqlite"] if what == "file" else []))


def test_schema_1_file_is_upgraded_in_place(tmp_path):
    """A file written before derived state had cursors: the summary's message count becomes the id of the
    last message it covers, and sessions count as fully derived (their vectors are not made again)."""
    from qlora.infer.store import APPLICATION_ID, _TABLES

    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    v1_tables = _TABLES.replace(",\n                       embedder TEXT, embedding_width INTEGER", "")
    for statement in filter(str.strip, v1_tables.split(";")):
        conn.execute(statement)
    conn.execute("INSERT INTO sessions VALUES (1, 'other', 'buffer', 0), (2, 's', 'summary-buffer', 0)")
    conn.executemany("INSERT INTO messages (session_id, role, content, created) VALUES (?, ?, ?, 0)",
                     [(1, "user", "x"), (2, "user", "a"), (2, "assistant", "b"), (1, "assistant", "y"),
                      (2, "user", "c"), (2, "assistant", "d")])
    conn.execute("INSERT INTO summaries VALUES (2, 'a and b', 2)")  # schema 1: covers the first 2 messages
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    store = ChatStore(path)
    session = store.session("s", "summary-buffer")
    assert session.summary() == ("a and b", 3)  # ids 2 and 3 are that session's first two messages
    assert [m.content for _, m in session.entries(after=3)] == ["c", "d"]
    assert session.progress("vectors") == 6 and session.embedder() is None
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_schema_2_file_is_upgraded_and_keeps_tool_turns(tmp_path):
    """Version 3 stores an assistant's tool calls and the call a tool result answers; older rows have none."""
    from qlora.infer.messages import Message
    from qlora.infer.store import _PROGRESS, APPLICATION_ID, _TABLES

    path = tmp_path / "v2.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in filter(str.strip, (_TABLES + _PROGRESS).split(";")):
        conn.execute(statement)
    conn.execute("INSERT INTO sessions (id, name, memory, created) VALUES (1, 's', 'buffer', 0)")
    conn.executemany("INSERT INTO messages (session_id, role, content, created) VALUES (1, ?, ?, 0)",
                     [("user", "hi"), ("assistant", "hello")])
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    store = ChatStore(path)
    session = store.session("s", "buffer")
    assert session.messages() == [Message("user", "hi"), Message("assistant", "hello")]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": "é", "n": [1]}}}
    turn = [Message("user", "q"), Message("assistant", "Checking.", (call,)), Message("tool", "42", tool_call_id="call_1"),
            Message("assistant", "It is 42.")]
    session.add_messages(turn)
    store.close()
    reopened = ChatStore(path)
    assert reopened.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    again = reopened.session("s", "buffer")
    assert again.messages()[2:] == turn
    assert [m for _, m in again.newest()][:4] == turn[::-1]
    reopened.close()


def _pixels(ref):
    import numpy as np

    return np.asarray(ref.load())


def test_a_user_message_s_images_are_stored_as_data_and_come_back_after_the_file_moved(tmp_path):
    """A session keeps each image of a message (``/image`` in ``qlora chat``) as its bytes, so a resumed
    session sends the model the same image, wherever the file went since."""
    pytest.importorskip("PIL")
    from image_models import write_png
    from qlora.chat.images import resolve_image

    first, second = write_png(tmp_path / "a.png", 12, 9, 0), write_png(tmp_path / "b.png", 7, 5, 1)
    refs = (resolve_image(str(first), "/image"), resolve_image(str(second), "/image"))
    sent = [Message("user", "compare <image> with <image>", images=refs), Message("assistant", "both red")]
    want = [_pixels(ref) for ref in refs]
    store = ChatStore(tmp_path / "chats.sqlite")
    store.session("s", "buffer").add_messages(sent)
    store.close()
    first.rename(tmp_path / "moved.png")
    second.unlink()
    reopened = ChatStore(tmp_path / "chats.sqlite")
    session = reopened.session("s", "buffer")
    user, reply = session.messages()
    assert user.content == sent[0].content and reply == sent[1] and session.unreadable == []
    assert [ref.shown for ref in user.images] == [str(first), str(second)]
    assert all((_pixels(got) == pixels).all() for got, pixels in zip(user.images, want))
    assert user.as_dict() == sent[0].as_dict()
    reopened.close()


def _session_with_a_damaged_image(tmp_path, text: str, count: int, damaged: int):
    """``(session, path, image file)``: a stored user message of ``count`` images (one file), the ``damaged``-th
    (from 0) of them no longer decoding (a damaged file), read back in a new store."""
    pytest.importorskip("PIL")
    from image_models import write_png
    from qlora.chat.images import resolve_image

    good = write_png(tmp_path / "a.png", 12, 9, 0)
    refs = tuple(resolve_image(str(good), "/image") for _ in range(count))
    path = tmp_path / "chats.sqlite"
    store = ChatStore(path)
    store.session("s", "buffer").add_messages([Message("user", text, images=refs), Message("assistant", "same")])
    (stored,) = store.conn.execute("SELECT images FROM messages WHERE role = 'user'").fetchone()
    images = json.loads(stored)
    images[damaged]["data"] = "data:image/png;base64,bm90IGFuIGltYWdl"  # "not an image"
    store.conn.execute("UPDATE messages SET images = ? WHERE role = 'user'", (json.dumps(images),))
    store.close()
    return ChatStore(path).session("s", "buffer"), path, good


def test_an_unreadable_stored_image_is_left_out_and_said(tmp_path):
    """An image whose stored data no longer decodes (a damaged file) is left out of its message, which keeps its
    readable images before its text, and said once; the session still reads."""
    session, path, good = _session_with_a_damaged_image(tmp_path, "compare <image> with <image>", 2, 1)
    user, _ = session.messages()
    assert user.content == "compare  with " and [ref.shown for ref in user.images] == [str(good)]
    (said,) = session.unreadable
    assert said.startswith(f"{path}, message 1 (image 2): image {str(good)!r} is not an image Pillow can read (")
    assert said.endswith("It is left out of the conversation.")
    session.messages()
    assert len(session.unreadable) == 1  # said once


def test_a_message_whose_every_stored_image_is_unreadable_is_said_once(tmp_path):
    """A message left with no readable image is checked once too: reading the session again (the memory reads it
    at every turn) neither decodes its images again nor repeats the line."""
    session, _, _ = _session_with_a_damaged_image(tmp_path, "what is <image>", 1, 0)
    user, _ = session.messages()
    assert user.content == "what is " and user.images == ()
    session.messages()
    list(session.newest())
    assert len(session.unreadable) == 1
