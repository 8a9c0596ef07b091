"""SQLite persistence of conversations: many named sessions in one file.

Each session keeps its messages (an assistant's tool calls and the call a tool
result answers included, and a user message's images as ``data:`` URIs of their
bytes, so a resumed session shows the model the same images wherever their files
went since), running summary, entity descriptions, triples
and embedded documents, so ``qlora chat --session NAME --db FILE`` continues a
conversation after the program exits. The file is in WAL mode (readers never
block the writer), every write is one ``BEGIN IMMEDIATE`` transaction, and a
busy timeout makes concurrent writers wait instead of failing. The schema
version is ``PRAGMA user_version``; ``application_id`` marks the file as ours,
so another program's database or a damaged file is reported, never modified.

Failures are told apart, each with its own exception: the file or its folder is
read-only (:class:`StoreReadOnly`; the store still opens read-only, so old
sessions can be read), another program holds the lock past the busy timeout
(:class:`StoreLocked`), the file is damaged or not ours (:class:`UsageError`).
Opening an existing session reads only; nothing is written until a turn is saved.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from array import array
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import quote

from ..errors import UsageError
from .memory.session import DERIVED, Entry, Triple, replace_triples
from .messages import Message

APPLICATION_ID = 0x514C4F52  # "QLOR"
SCHEMA_VERSION = 4
BUSY_TIMEOUT_S = 10.0

_TABLES = """
CREATE TABLE sessions (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, memory TEXT NOT NULL, created REAL NOT NULL,
                       embedder TEXT, embedding_width INTEGER);
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
# Version 2: ids instead of counts for what derived state covers (``progress``), the embedder per session.
_PROGRESS = """
CREATE TABLE progress (session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, kind TEXT NOT NULL,
                       through INTEGER NOT NULL, PRIMARY KEY (session_id, kind));
"""
_MIGRATE_1_TO_2 = """
ALTER TABLE sessions ADD COLUMN embedder TEXT;
ALTER TABLE sessions ADD COLUMN embedding_width INTEGER;
UPDATE summaries SET covered = COALESCE((SELECT r.id FROM (SELECT id, session_id, row_number() OVER
                                         (PARTITION BY session_id ORDER BY id) AS n FROM messages) r
                                         WHERE r.session_id = summaries.session_id AND r.n = summaries.covered), 0)
  WHERE covered > 0;
INSERT INTO progress SELECT session_id, 'summary', covered FROM summaries;
INSERT INTO progress SELECT s.id, k.kind, (SELECT max(id) FROM messages WHERE session_id = s.id)
  FROM sessions s, (SELECT 'entities' AS kind UNION SELECT 'triples' UNION SELECT 'vectors') k
  WHERE EXISTS (SELECT 1 FROM messages WHERE session_id = s.id);
"""

# Version 3: an assistant message's tool calls (JSON list) and the call a tool result answers.
_MIGRATE_2_TO_3 = """
ALTER TABLE messages ADD COLUMN tool_calls TEXT;
ALTER TABLE messages ADD COLUMN tool_call_id TEXT;
"""

# Version 4: a user message's images, a JSON list of {"data": data: URI, "shown": how the user named it}.
_MIGRATE_3_TO_4 = """
ALTER TABLE messages ADD COLUMN images TEXT;
"""

_SESSION_TABLES = ("messages", "summaries", "entities", "triples", "vectors", "progress")


class StoreLocked(UsageError):
    """Another program held the database's write lock for longer than the busy timeout."""


class StoreReadOnly(UsageError):
    """The database file or its folder cannot be written."""


def _is_locked(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(exc).lower()


def _is_read_only(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_READONLY") or "readonly" in str(exc).lower()


def _statements(script: str) -> list[str]:
    return [s for s in script.split(";") if s.strip()]


class ChatStore:
    """A chat database file; open it once, get sessions from it by name.

    A file or folder this process may not write is opened read-only
    (:attr:`read_only`): sessions in it can be read, and every write raises
    :class:`StoreReadOnly`.

    Args:
        path: the SQLite file; created (with its schema) if missing.
        timeout: seconds a write waits for another program's lock before
            :class:`StoreLocked`.

    Raises:
        StoreLocked: the lock was held past ``timeout`` while the file had to be created or upgraded.
        StoreReadOnly: the file is missing and its folder is read-only, or it must be upgraded and is read-only.
        UsageError: the file is not a SQLite database, is damaged, belongs to
            another program, or was written by a newer qlora.
    """

    def __init__(self, path: str | Path, timeout: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.timeout = timeout
        folder = self.path.absolute().parent
        if self.path.exists() and not self.path.is_file():
            raise UsageError(f"chat database {self.path} is not a file; pass a file path with --db")
        if not self.path.exists():
            if not folder.is_dir():
                raise UsageError(f"cannot create chat database {self.path}: folder {folder} does not exist")
            if not os.access(folder, os.W_OK):
                raise StoreReadOnly(f"cannot create chat database {self.path}: folder {folder} is read-only; "
                                    "pass --db a file in a folder you can write")
        self.read_only = not (os.access(folder, os.W_OK) and (not self.path.exists() or os.access(self.path, os.W_OK)))
        try:
            self.conn = self._connect()
        except sqlite3.Error as exc:
            raise UsageError(f"cannot open chat database {self.path}: {exc}; pass --db a file in a folder you can "
                             "write") from exc
        try:
            self._prepare()
        except UsageError:
            self.conn.close()
            raise
        except sqlite3.Error as exc:
            self.conn.close()
            if _is_locked(exc):
                raise StoreLocked(f"{self.path} is locked by another program (waited {self.timeout:g} s); "
                                  "close that program or try again") from exc
            raise UsageError(f"{self.path} is not a usable qlora chat database ({exc}); "
                             "it is damaged or not a SQLite file: pass another --db path") from exc

    def _connect(self) -> sqlite3.Connection:
        if not self.read_only:
            return sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        # Read-only: with a live WAL (a writer is running, or one crashed) read it as SQLite
        # does; otherwise open the file as immutable, which creates no -wal/-shm files.
        uri = quote(str(self.path.absolute()))
        live = Path(f"{self.path}-wal").exists() and Path(f"{self.path}-shm").exists()
        flags = "mode=ro" if live else "mode=ro&immutable=1"
        return sqlite3.connect(f"file:{uri}?{flags}", uri=True, timeout=self.timeout, isolation_level=None)

    def _prepare(self) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        app_id, version, tables = self._header()
        if app_id == 0 and version == 0 and tables == 0:
            if self.read_only:
                raise StoreReadOnly(f"cannot create a chat database in {self.path}: it is read-only")
            with self.transaction():
                if self._header() == (0, 0, 0):  # still empty: no other process created it meanwhile
                    for statement in _statements(_TABLES + _PROGRESS + _MIGRATE_2_TO_3 + _MIGRATE_3_TO_4):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            app_id, version, tables = self._header()
        if app_id != APPLICATION_ID:
            raise UsageError(f"{self.path} is a SQLite database of another program, not a qlora chat "
                             "database; pass another --db path")
        if version > SCHEMA_VERSION:
            raise UsageError(f"{self.path} has chat schema version {version}, newer than this qlora "
                             f"understands ({SCHEMA_VERSION}); upgrade qlora")
        if version < SCHEMA_VERSION:
            self._upgrade(version)
        if not self.read_only and self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            if self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise UsageError(f"{self.path}: cannot switch the chat database to WAL mode")
        problems = [row[0] for row in self.conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise UsageError(f"{self.path} is damaged: {'; '.join(problems[:3])}")

    def _header(self) -> tuple[int, int, int]:
        """Application id, schema version and table count, read from one snapshot: read statement by statement,
        another process's creation committed between them would show a half-made header (an id of 0 beside its
        tables), taken for another program's database."""
        if self.conn.in_transaction:
            return self._read_header()
        self.conn.execute("BEGIN")
        try:
            return self._read_header()
        finally:
            self.conn.execute("COMMIT")

    def _read_header(self) -> tuple[int, int, int]:
        return (self.conn.execute("PRAGMA application_id").fetchone()[0],
                self.conn.execute("PRAGMA user_version").fetchone()[0],
                self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])

    def _upgrade(self, version: int) -> None:
        if self.read_only:
            raise StoreReadOnly(f"{self.path} was written by an older qlora (chat schema {version}) and must be "
                                "upgraded once, but it is read-only; make it writable and run qlora chat once")
        with self.transaction():
            found = self.conn.execute("PRAGMA user_version").fetchone()[0]
            steps = {1: _PROGRESS + _MIGRATE_1_TO_2 + _MIGRATE_2_TO_3 + _MIGRATE_3_TO_4,
                     2: _MIGRATE_2_TO_3 + _MIGRATE_3_TO_4, 3: _MIGRATE_3_TO_4}.get(found)
            if steps is not None:  # else another process upgraded it meanwhile
                for statement in _statements(steps):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken up front so concurrent writers queue on the busy timeout.

        Raises:
            StoreReadOnly: the store was opened read-only, or the file became read-only.
            StoreLocked: another program held the lock for the whole busy timeout.
        """
        if self.read_only:
            raise StoreReadOnly(f"{self.path} is read-only")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise self._translate(exc) from exc
            raise

    def _translate(self, exc: sqlite3.OperationalError) -> Exception:
        if _is_locked(exc):
            return StoreLocked(f"{self.path}: database locked by another program (waited {self.timeout:g} s)")
        if _is_read_only(exc):
            return StoreReadOnly(f"{self.path} is read-only")
        return exc

    def read(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """A query, with a lock held past the busy timeout reported as :class:`StoreLocked`."""
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def session(self, name: str, memory: str) -> StoredSession:
        """The session ``name``, created for memory kind ``memory`` if new (only then is anything written).

        Raises:
            UsageError: it exists and was created for another memory kind.
            StoreReadOnly, StoreLocked: it is new and cannot be created.
        """
        row = self.read("SELECT id, memory FROM sessions WHERE name = ?", (name,)).fetchone()
        if row is None:
            if self.read_only:
                raise StoreReadOnly(f"session {name!r} does not exist in {self.path}, which is read-only, so it "
                                    f"cannot be created; sessions there: {', '.join(self.sessions()) or 'none'}")
            with self.transaction() as conn:
                conn.execute("INSERT OR IGNORE INTO sessions (name, memory, created) VALUES (?, ?, ?)",
                             (name, memory, time.time()))
                row = conn.execute("SELECT id, memory FROM sessions WHERE name = ?", (name,)).fetchone()
        session_id, stored = row
        if stored != memory:
            raise UsageError(f"session {name!r} in {self.path} uses --memory {stored}, not {memory}; "
                             f"resume it with --memory {stored} or start a new --session")
        return StoredSession(self, session_id)

    def sessions(self) -> list[str]:
        """Names of all sessions, oldest first."""
        return [row[0] for row in self.read("SELECT name FROM sessions ORDER BY id")]

    def close(self) -> None:
        self.conn.close()


_MESSAGE = "id, role, content, tool_calls, tool_call_id, images"


def _stored_images(images: Sequence) -> str | None:
    """A message's images (ImageRefs) as the ``images`` column keeps them: each one's bytes, whatever its file does
    later.

    Raises:
        UsageError: an image that cannot be read any more (its file gone since it was attached).
    """
    if not images:
        return None
    return json.dumps([{"data": ref.data_uri(), "shown": ref.shown} for ref in images])


class StoredSession:
    """A :class:`~qlora.infer.memory.session.Session` whose state lives in a :class:`ChatStore`.

    Every derived write checks the session's ``progress`` cursor in its own
    transaction, so two processes catching up on one session derive each exchange once.

    A stored image that no longer reads (a damaged file) is left out of its message, whose ``<image>``
    placeholders then go (its other images come before its text), and said once in :attr:`unreadable`.
    """

    def __init__(self, store: ChatStore, session_id: int) -> None:
        self.store = store
        self.id = session_id
        self.unreadable: list[str] = []  # a line for each stored image left out, in the order they were read
        self._images: dict[int, tuple] = {}  # message id -> its images, checked once

    def _entry(self, row: tuple) -> Entry:
        message_id, role, content, calls, call_id, images = row
        refs: tuple = ()
        if images:
            refs = self._images[message_id] if message_id in self._images else self._read_images(message_id, images)
            if len(refs) < len(json.loads(images)):
                from .messages import IMAGE_PLACEHOLDER

                content = content.replace(IMAGE_PLACEHOLDER, "")
        return message_id, Message(role, content, tuple(json.loads(calls)) if calls else (), call_id, images=refs)

    def _read_images(self, message_id: int, images: str) -> tuple:
        from ..chat.images import ImageRef, checked_image

        refs = []
        for k, image in enumerate(json.loads(images)):
            where = f"{self.store.path}, message {message_id} (image {k + 1})"
            try:
                refs.append(checked_image(ImageRef(image["data"], image["shown"], where), advice=""))
            except UsageError as exc:
                self.unreadable.append(f"{str(exc).strip()} It is left out of the conversation.")
        self._images[message_id] = tuple(refs)
        return self._images[message_id]

    def _rows(self, sql: str, *params) -> list[tuple]:
        return self.store.read(sql, (self.id, *params)).fetchall()

    def messages(self) -> list[Message]:
        return [m for _, m in self.entries()]

    def entries(self, after: int = 0) -> list[Entry]:
        rows = self._rows(f"SELECT {_MESSAGE} FROM messages WHERE session_id = ? AND id > ? ORDER BY id", after)
        return [self._entry(row) for row in rows]

    def newest(self) -> Iterator[Entry]:
        """Newest first, read lazily: the caller's early stop ends the scan (cost ∝ what is read)."""
        cursor = self.store.read(f"SELECT {_MESSAGE} FROM messages WHERE session_id = ? ORDER BY id DESC", (self.id,))
        return (self._entry(row) for row in cursor)

    def add_messages(self, messages: Sequence[Message]) -> int:
        now = time.time()
        rows = [(self.id, m.role, m.content, now,
                 json.dumps(list(m.tool_calls), ensure_ascii=False) if m.tool_calls else None,
                 m.tool_call_id, _stored_images(m.images)) for m in messages]
        with self.store.transaction() as conn:
            conn.executemany("INSERT INTO messages (session_id, role, content, created, tool_calls, tool_call_id, "
                             "images) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            return conn.execute("SELECT max(id) FROM messages WHERE session_id = ?", (self.id,)).fetchone()[0]

    def progress(self, kind: str) -> int:
        rows = self._rows("SELECT through FROM progress WHERE session_id = ? AND kind = ?", kind)
        return rows[0][0] if rows else 0

    @contextmanager
    def _derive(self, kind: str, through: int) -> Iterator[sqlite3.Connection | None]:
        """A transaction that moves cursor ``kind`` to ``through``; yields None (and writes
        nothing) when that exchange was already derived from, by this process or another."""
        assert kind in DERIVED, kind
        with self.store.transaction() as conn:
            row = conn.execute("SELECT through FROM progress WHERE session_id = ? AND kind = ?",
                               (self.id, kind)).fetchone()
            if row is not None and row[0] >= through:
                yield None
                return
            conn.execute("INSERT OR REPLACE INTO progress VALUES (?, ?, ?)", (self.id, kind, through))
            yield conn

    def summary(self) -> tuple[str, int]:
        rows = self._rows("SELECT summary FROM summaries WHERE session_id = ?")
        return (rows[0][0] if rows else ""), self.progress("summary")

    def set_summary(self, text: str, through: int) -> bool:
        with self._derive("summary", through) as conn:
            if conn is not None:
                conn.execute("INSERT OR REPLACE INTO summaries VALUES (?, ?, ?)", (self.id, text, through))
            return conn is not None

    def entities(self) -> dict[str, str]:
        return dict(self._rows("SELECT name, summary FROM entities WHERE session_id = ? ORDER BY rowid"))

    def set_entities(self, entities: dict[str, str], through: int) -> bool:
        with self._derive("entities", through) as conn:
            if conn is not None:
                conn.executemany("INSERT INTO entities VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET summary = excluded.summary",
                                 [(self.id, n, s) for n, s in entities.items()])
            return conn is not None

    def triples(self) -> list[Triple]:
        return self._rows("SELECT subject, relation, object FROM triples WHERE session_id = ? ORDER BY id")

    def add_triples(self, triples: Sequence[Triple], through: int) -> bool:
        with self._derive("triples", through) as conn:
            if conn is None:
                return False
            known = [tuple(r) for r in conn.execute(
                "SELECT subject, relation, object FROM triples WHERE session_id = ? ORDER BY id", (self.id,))]
            kept = replace_triples(known, triples)
            conn.executemany("DELETE FROM triples WHERE session_id = ? AND subject = ? AND relation = ? AND object = ?",
                             [(self.id, *t) for t in known if t not in kept])
            conn.executemany("INSERT OR IGNORE INTO triples (session_id, subject, relation, object) VALUES (?, ?, ?, ?)",
                             [(self.id, *t) for t in kept if t not in known])
            return True

    def vectors(self, after: int = 0) -> list[tuple[int, str, bytes]]:
        return self._rows("SELECT id, text, embedding FROM vectors WHERE session_id = ? AND id > ? ORDER BY id", after)

    def add_vector(self, text: str, embedding: Sequence[float], through: int, embedder: str) -> bool:
        with self._derive("vectors", through) as conn:
            if conn is None:
                return False
            conn.execute("UPDATE sessions SET embedder = ?, embedding_width = ? WHERE id = ? AND embedder IS NULL",
                         (embedder, len(embedding), self.id))
            conn.execute("INSERT INTO vectors (session_id, text, embedding) VALUES (?, ?, ?)",
                         (self.id, text, array("f", embedding).tobytes()))
            return True

    def embedder(self) -> tuple[str, int] | None:
        name, width = self._rows("SELECT embedder, embedding_width FROM sessions WHERE id = ?")[0]
        if name is None:
            legacy = self._rows("SELECT length(embedding) FROM vectors WHERE session_id = ? LIMIT 1")
            return ("(not recorded)", legacy[0][0] // 4) if legacy else None
        return name, width

    def clear(self) -> None:
        with self.store.transaction() as conn:
            for table in _SESSION_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE session_id = ?", (self.id,))
            conn.execute("UPDATE sessions SET embedder = NULL, embedding_width = NULL WHERE id = ?", (self.id,))
