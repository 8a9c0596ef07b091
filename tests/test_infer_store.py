"""SQLite chat store: round trips across processes, concurrent writers, damaged and foreign files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
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
    assert [(i, t, list(v)) for i, t, v in s.vectors()] == [(1, "input: hi", [0.5, -1.0, 2.0])]
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
