"""The workspace's state database: what a build remembers between runs of one workspace.

One SQLite file in WAL mode in the state directory (``dtbuild-out/.dtbuild/state.db``)
holds the tables a no-op build reads in one query each and a change rewrites only a row
of:

* ``results``: the action results this workspace used last, by key, each with the store
  generation it was checked under (an entry of the store's current generation is trusted
  present without a stat) and when its action-cache entry was last marked used;
* ``inputs``: each action's last inputs, for ``explain``;
* ``sources``: source digests by file-system signature (:mod:`dtbuild.engine.sources`);
* ``durations``: how long each action took when it last ran (the scheduler starts the
  longest remaining path first).

The database is an optimisation only: a damaged, foreign or unreadable one is a miss
(it is deleted and made again), never a failed build. Every method swallows SQLite's
errors for the same reason. A workspace copied from someone else may carry its state
directory, and forged results rows would name blobs for keys anyone can compute: so a
database is bound to this user's state key (the one that signs the package cache), an
HMAC of it in the ``meta`` table, and one made under another key is foreign.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

STATE_DB_FILE = "state.db"
#: Written in the ``meta`` table; a database without it (or with another) is made again.
SCHEMA = "dtbuild-state-1"
#: Action results remembered per workspace (about 300 bytes each).
RESULTS_LIMIT = 50_000

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
    "generation TEXT NOT NULL, used REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS inputs (action TEXT PRIMARY KEY, key TEXT NOT NULL, entry TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sources (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
    "ino INTEGER, ctime_ns INTEGER, mode INTEGER, digest TEXT NOT NULL, link TEXT)",
    "CREATE TABLE IF NOT EXISTS durations (action TEXT PRIMARY KEY, seconds REAL NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class KnownResult:
    """A row of the results index."""

    result: dict[str, Any]
    #: The store generation the result's outputs were last found present under.
    generation: str
    #: When its action-cache entry was last marked used (seconds since the epoch).
    used: float


class StateDB:
    """The state database of one workspace (opened on first use, thread-safe)."""

    def __init__(self, state_dir: str, owner_key: bytes | None = None) -> None:
        """``owner_key``: the user's state key; a database made under another is foreign
        (None: the database is not bound to a key)."""
        self.path = os.path.join(state_dir, STATE_DB_FILE)
        self._owner = hmac.new(owner_key, SCHEMA.encode(), hashlib.sha256).hexdigest() if owner_key else None
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        self._broken = False  # the database could not be made: work without it

    # ------------------------------------------------------------------ the connection

    def _connect(self) -> sqlite3.Connection | None:
        if self._conn is not None or self._broken:
            return self._conn
        for attempt in range(2):
            try:
                conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            except sqlite3.Error:
                self._broken = True
                return None
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                # WAL with NORMAL: a commit survives a crash of the process; a power loss may
                # lose the last one, which is only a miss.
                conn.execute("PRAGMA synchronous=NORMAL")
                found = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
                if found:
                    schema = conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
                    if schema is None or schema[0] != SCHEMA:
                        raise sqlite3.DatabaseError("a database of another program or version")
                    if self._owner is not None:
                        owner = conn.execute("SELECT value FROM meta WHERE name='owner'").fetchone()
                        if owner is None or not hmac.compare_digest(str(owner[0]), self._owner):
                            raise sqlite3.DatabaseError("a database made under another user's key")
                with _transaction(conn):
                    for statement in _TABLES:
                        conn.execute(statement)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA,))
                    if self._owner is not None:
                        conn.execute("INSERT OR IGNORE INTO meta VALUES ('owner', ?)", (self._owner,))
                self._conn = conn
                return conn
            except sqlite3.Error:
                conn.close()
                if attempt == 0:
                    self._remove_files()  # damaged or foreign: start again empty
        self._broken = True
        return None

    def _remove_files(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(self.path + suffix)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None

    def _damaged(self) -> None:
        """The database turned out damaged while in use: start again empty."""
        self.close()
        self._remove_files()

    def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connect()
            if conn is None:
                return []
            try:
                return conn.execute(query, args).fetchall()
            except sqlite3.OperationalError:
                return []  # busy, or a missing table: a miss
            except sqlite3.Error:
                self._damaged()
                return []

    def _write(self, statements: Iterable[tuple[str, Iterable[tuple[Any, ...]]]]) -> None:
        """Run ``(statement, rows)`` pairs in one transaction (nothing when it fails)."""
        statements = [(statement, list(rows)) for statement, rows in statements]
        with self._lock:
            for _attempt in range(2):
                conn = self._connect()
                if conn is None:
                    return
                try:
                    with _transaction(conn):
                        for statement, rows in statements:
                            conn.executemany(statement, rows)
                    return
                except sqlite3.OperationalError:
                    return  # busy, read-only or full: the state is an optimisation only
                except sqlite3.Error:
                    self._damaged()

    # ------------------------------------------------------------------ results

    def results(self) -> dict[str, KnownResult]:
        """The results index (entries that do not parse are left out: misses)."""
        known: dict[str, KnownResult] = {}
        rows = self._read("SELECT key, result, generation, used FROM results")
        try:
            # One parse for all rows. A row that is not one JSON value either breaks the
            # array (empty, or closing it early) or changes its length: then row by row.
            values = json.loads("[" + ",".join(row[1] for row in rows) + "]")
            if len(values) != len(rows):
                raise ValueError("a row that is not one JSON value")
        except (TypeError, ValueError):
            values = []
            for row in rows:
                try:
                    values.append(json.loads(row[1]))
                except (TypeError, ValueError):
                    values.append(None)
        for (key, _, generation, used), value in zip(rows, values, strict=True):
            if isinstance(value, dict) and isinstance(key, str):
                known[key] = KnownResult(value, str(generation), float(used or 0))
        return known

    def put_results(self, rows: Iterable[tuple[str, dict[str, Any], str, float]]) -> None:
        """Add or replace ``(key, result, generation, used)`` rows, then drop the least
        recently used entries over :data:`RESULTS_LIMIT`."""
        encoded = [(key, json.dumps(result, separators=(",", ":")), generation, used)
                   for key, result, generation, used in rows]
        if not encoded:
            return
        self._write([
            ("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)", encoded),
            ("DELETE FROM results WHERE key IN (SELECT key FROM results ORDER BY used DESC LIMIT -1 OFFSET ?)",
             [(RESULTS_LIMIT,)]),
        ])

    def mark_results_used(self, keys: Iterable[str], when: float) -> None:
        rows = [(when, key) for key in keys]
        if rows:
            self._write([("UPDATE results SET used = ? WHERE key = ?", rows)])

    # ------------------------------------------------------------------ explain record

    def input_keys(self) -> dict[str, str]:
        """The key each action had when it was last recorded, by action id."""
        return {aid: key for aid, key in self._read("SELECT action, key FROM inputs")}

    def input_record(self, action_id: str) -> dict[str, Any] | None:
        """The recorded last inputs of one action, or None."""
        for (text,) in self._read("SELECT entry FROM inputs WHERE action = ?", (action_id,)):
            try:
                value = json.loads(text)
            except (TypeError, ValueError):
                return None
            return value if isinstance(value, dict) else None
        return None

    def put_inputs(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> None:
        encoded = [(aid, str(entry.get("key", "")), json.dumps(entry, sort_keys=True)) for aid, entry in rows]
        if encoded:
            self._write([("INSERT OR REPLACE INTO inputs VALUES (?, ?, ?)", encoded)])

    # ------------------------------------------------------------------ source digests

    def sources(self) -> dict[str, list[Any]]:
        """Source digest memo: path -> [size, mtime_ns, ino, ctime_ns, mode, digest, link]."""
        return {row[0]: list(row[1:]) for row in
                self._read("SELECT path, size, mtime_ns, ino, ctime_ns, mode, digest, link FROM sources")
                if isinstance(row[6], str) and (row[7] is None or isinstance(row[7], str))}

    def put_sources(self, rows: Iterable[tuple[str, list[Any]]]) -> None:
        encoded = [(path, *entry) for path, entry in rows]
        if encoded:
            self._write([("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?)", encoded)])

    # ------------------------------------------------------------------ durations

    def durations(self) -> dict[str, float]:
        """Seconds each action took when it last ran, by action id."""
        return {aid: float(s) for aid, s in self._read("SELECT action, seconds FROM durations")
                if isinstance(s, int | float)}

    def put_durations(self, rows: Iterable[tuple[str, float]]) -> None:
        rows = list(rows)
        if rows:
            self._write([("INSERT OR REPLACE INTO durations VALUES (?, ?)", rows)])


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


__all__ = ["RESULTS_LIMIT", "STATE_DB_FILE", "KnownResult", "StateDB"]
