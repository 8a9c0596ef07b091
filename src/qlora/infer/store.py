"""SQLite persistence of conversations: many named sessions in one file.

Each session keeps its messages, running summary, entity descriptions, triples
and embedded documents, so ``qlora chat --session NAME --db FILE`` continues a
conversation after the program exits. The file is in WAL mode (readers never
block the writer), every write is one ``BEGIN IMMEDIATE`` transaction, and a
busy timeout makes concurrent writers wait instead of failing. The schema
version is ``PRAGMA user_version``; ``application_id`` marks the file as ours,
so another program's database or a damaged file is reported, never modified.
"""

from __future__ import annotations

import sqlite3
import time
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import UsageError
from .messages import Message

APPLICATION_ID = 0x514C4F52  # "QLOR"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, memory TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
                       role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
CREATE INDEX messages_session ON messages(session_id, id);
CREATE TABLE summaries (session_id INTEGER PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
                        summary TEXT NOT NULL, covered INTEGER NOT NULL);
CREATE TABLE entities (session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
                       name TEXT NOT NULL, summary TEXT NOT NULL, PRIMARY KEY (session_id, name));
CREATE TABLE triples (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
                      subject TEXT NOT NULL, relation TEXT NOT NULL, object TEXT NOT NULL,
                      UNIQUE (session_id, subject, relation, object));
CREATE TABLE vectors (id INTEGER PRIMARY KEY, session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
                      text TEXT NOT NULL, embedding BLOB NOT NULL);
"""

_SESSION_TABLES = ("messages", "summaries", "entities", "triples", "vectors")


class ChatStore:
    """A chat database file; open it once, get sessions from it by name.

    Raises:
        UsageError: the file is not a SQLite database, is damaged, belongs to
            another program, or was written by a newer qlora.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open chat database {self.path}: {exc}") from exc
        try:
            self._prepare()
        except UsageError:
            self.conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            raise UsageError(f"{self.path} is not a usable qlora chat database ({exc}); "
                             "it is damaged or not a SQLite file: pass another --db path") from exc

    def _prepare(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        with self.transaction():
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and version == 0 and tables == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif app_id != APPLICATION_ID:
                raise UsageError(f"{self.path} is a SQLite database of another program, not a qlora chat "
                                 "database; pass another --db path")
            elif version > SCHEMA_VERSION:
                raise UsageError(f"{self.path} has chat schema version {version}, newer than this qlora "
                                 f"understands ({SCHEMA_VERSION}); upgrade qlora")
        if self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise UsageError(f"{self.path}: cannot switch the chat database to WAL mode")
        problems = [row[0] for row in self.conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise UsageError(f"{self.path} is damaged: {'; '.join(problems[:3])}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so concurrent writers queue on the busy timeout."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def session(self, name: str, memory: str) -> StoredSession:
        """The session ``name``, created for memory kind ``memory`` if new.

        Raises:
            UsageError: it exists and was created for another memory kind.
        """
        with self.transaction() as conn:
            conn.execute("INSERT OR IGNORE INTO sessions (name, memory, created) VALUES (?, ?, ?)",
                         (name, memory, time.time()))
            session_id, stored = conn.execute("SELECT id, memory FROM sessions WHERE name = ?", (name,)).fetchone()
        if stored != memory:
            raise UsageError(f"session {name!r} in {self.path} uses --memory {stored}, not {memory}; "
                             f"resume it with --memory {stored} or start a new --session")
        return StoredSession(self, session_id)

    def sessions(self) -> list[str]:
        """Names of all sessions, oldest first."""
        return [row[0] for row in self.conn.execute("SELECT name FROM sessions ORDER BY id")]

    def close(self) -> None:
        self.conn.close()


class StoredSession:
    """A :class:`~qlora.infer.memory.session.Session` whose state lives in a :class:`ChatStore`."""

    def __init__(self, store: ChatStore, session_id: int) -> None:
        self.store = store
        self.id = session_id

    def _rows(self, sql: str) -> list[tuple]:
        return self.store.conn.execute(sql, (self.id,)).fetchall()

    def messages(self) -> list[Message]:
        return [Message(r, c) for r, c in self._rows("SELECT role, content FROM messages WHERE session_id = ? ORDER BY id")]

    def add_messages(self, messages: Sequence[Message]) -> None:
        now = time.time()
        with self.store.transaction() as conn:
            conn.executemany("INSERT INTO messages (session_id, role, content, created) VALUES (?, ?, ?, ?)",
                             [(self.id, m.role, m.content, now) for m in messages])

    def summary(self) -> tuple[str, int]:
        rows = self._rows("SELECT summary, covered FROM summaries WHERE session_id = ?")
        return rows[0] if rows else ("", 0)

    def set_summary(self, text: str, covered: int) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO summaries VALUES (?, ?, ?)", (self.id, text, covered))

    def entities(self) -> dict[str, str]:
        return dict(self._rows("SELECT name, summary FROM entities WHERE session_id = ? ORDER BY rowid"))

    def set_entities(self, entities: dict[str, str]) -> None:
        with self.store.transaction() as conn:
            conn.executemany("INSERT INTO entities VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET summary = excluded.summary",
                             [(self.id, n, s) for n, s in entities.items()])

    def triples(self) -> list[tuple[str, str, str]]:
        return self._rows("SELECT subject, relation, object FROM triples WHERE session_id = ? ORDER BY id")

    def add_triples(self, triples: Sequence[tuple[str, str, str]]) -> None:
        with self.store.transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO triples (session_id, subject, relation, object) VALUES (?, ?, ?, ?)",
                             [(self.id, *t) for t in triples])

    def vectors(self) -> list[tuple[str, list[float]]]:
        return [(text, array("f", blob).tolist())
                for text, blob in self._rows("SELECT text, embedding FROM vectors WHERE session_id = ? ORDER BY id")]

    def add_vector(self, text: str, embedding: Sequence[float]) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO vectors (session_id, text, embedding) VALUES (?, ?, ?)",
                         (self.id, text, array("f", embedding).tobytes()))

    def clear(self) -> None:
        with self.store.transaction() as conn:
            for table in _SESSION_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (self.id,))
