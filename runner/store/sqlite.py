"""SQLite plumbing: the file, its pragmas, its locking, and its errors in plain words.

Everything here is specific to SQLite; the rest of the store is dialect-neutral SQLAlchemy.
Writers take the write lock up front (``BEGIN IMMEDIATE``) so two writers queue on the busy
timeout instead of deadlocking; readers begin deferred and, in WAL mode, never wait for a writer.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import StoreError

_WRITES = "batchrun_writes"  # execution option of connections whose transactions write
BUSY_TIMEOUT_MS = 5000


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy own transactions (pysqlite's implicit BEGIN is off).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    # FULL: a committed result survives a power cut, not just a killed process. Commits are
    # batched, so the fsync is paid a few times a second, not once per result.
    cur.execute("PRAGMA synchronous = FULL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _on_connect_readonly(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.close()


def _on_begin(conn: Connection) -> None:
    writes = conn.get_execution_options().get(_WRITES)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _create_private(path: Path) -> None:
    """Create an empty database file readable by its owner only (SQLite's -wal/-shm inherit it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class SQLite:
    """One SQLite database file."""

    name = "sqlite"
    multi_host = False  # runners sharing it must be on this machine

    def __init__(self, path: Path) -> None:
        self.path = path
        self.display = str(path)
        self._identity: tuple[int, int] | None = None

    def create_engine(self, *, readonly: bool = False, create: bool = True) -> Engine:
        path = self.path
        if path.is_dir():
            raise StoreError(f"{path}: is a directory, not a database file")
        if (readonly or not create) and not path.exists():
            raise StoreError(f"{path}: no such database (run a job first, or pass --db)")
        if readonly:
            url = f"sqlite+pysqlite:///file:{path}?mode=ro&uri=true"
            engine = sa.create_engine(url, connect_args={"check_same_thread": False})
            sa.event.listen(engine, "connect", _on_connect_readonly)
        else:
            self._refuse_foreign()
            try:
                _create_private(path)
            except OSError as exc:
                raise StoreError(f"{path}: cannot create database: {exc.strerror}") from None
            engine = sa.create_engine(
                f"sqlite+pysqlite:///{path}",
                connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
            )
            sa.event.listen(engine, "connect", _on_connect)
        sa.event.listen(engine, "begin", _on_begin)
        self._identity = _identity(path)
        return engine

    @contextlib.contextmanager
    def writing(self, engine: Engine) -> Iterator[Connection]:
        """A write transaction: BEGIN IMMEDIATE, then COMMIT (ROLLBACK on error)."""
        self.check_present()
        with engine.connect() as conn:
            conn.execution_options(**{_WRITES: True})
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def reading(self, engine: Engine) -> Iterator[Connection]:
        """A deferred transaction (begun by the first query): in WAL mode it reads one
        snapshot until it ends."""
        with engine.connect() as conn:
            yield conn

    def check_present(self) -> None:
        """Refuse to write when the file we opened was deleted or replaced: SQLite would go on
        writing into the unlinked file, and every result would be lost with it."""
        if self._identity is not None and _identity(self.path) != self._identity:
            raise StoreError(
                f"{self.path}: the database file was deleted or replaced while batchrun was "
                "using it; stopping so that no result is written where nobody can read it"
            )

    def _refuse_foreign(self) -> None:
        """Look before opening for writing (which switches the file to WAL mode): a file that
        holds another program's tables is never touched."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
            ) as conn:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error:
            return  # not a database at all: the migration check says so in plain words
        if names and "alembic_version" not in names:
            raise StoreError(
                f"{self.path}: this database holds tables that are not batchrun's; pass --db "
                "with a new file (or an empty database)"
            )

    def is_foreign(self, engine: Engine) -> bool:
        """Whether the file holds tables but is not a batchrun database."""
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
        return bool(names) and "alembic_version" not in names

    def lock_schema(self, conn: Connection) -> None:
        """Migrations already run one at a time: a write transaction holds the file's lock."""

    def now(self, conn: Connection) -> float:
        """Every runner of an SQLite job is on this machine: its clock is the shared one."""
        return time.time()

    def retryable(self, exc: BaseException) -> bool:
        return False  # writers queue on the busy timeout instead of conflicting

    def insert_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        stream: bool = False,
    ) -> None:
        """Insert rows through the raw sqlite3 connection, in the open transaction.

        ``stream`` (a job's requests): ``executemany`` runs on a helper thread, fed in chunks;
        SQLite does its B-tree work without the GIL, so it overlaps with the caller producing
        the next rows (a job import parses and counts tokens meanwhile).
        """
        raw = conn.connection.dbapi_connection
        assert raw is not None
        row = f"({', '.join('?' * len(columns))})"
        head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
        sql = head + row
        many = head + ", ".join([row] * _ROWS_PER_INSERT)

        def consume(chunks: Iterator[list[Sequence[Any]]]) -> None:
            # Many rows per statement: the helper thread takes the GIL back once per statement
            # (SQLite releases it for each step), not once per row, which would make the
            # producing thread hand it over a million times.
            flat = itertools.chain.from_iterable
            for chunk in chunks:
                whole = len(chunk) - len(chunk) % _ROWS_PER_INSERT
                raw.executemany(
                    many,
                    (tuple(flat(chunk[i : i + _ROWS_PER_INSERT]))
                     for i in range(0, whole, _ROWS_PER_INSERT)),
                )  # fmt: skip
                if whole < len(chunk):
                    raw.executemany(sql, chunk[whole:])

        try:
            if stream:
                feed_in_thread(consume, rows)
            else:
                raw.executemany(sql, rows)
        except sqlite3.Error as exc:  # the driver's own error: as SQLAlchemy would raise it
            raise sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from None

    def update_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        same: dict[str, Any] | None = None,
    ) -> None:
        """``UPDATE table SET columns[1:] (and ``same``) WHERE columns[0] = ...`` per row."""
        if not rows:
            return
        same = same or {}
        sets = [f"{c} = ?" for c in columns[1:]] + [f"{c} = ?" for c in same]
        sql = f"UPDATE {table.name} SET {', '.join(sets)} WHERE {columns[0]} = ?"
        tail = tuple(same.values())
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            raw.executemany(sql, [(*r[1:], *tail, r[0]) for r in rows])
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error) from None

    def describe(self, exc: BaseException) -> str:
        """An SQLite error in words a user can act on."""
        orig = getattr(exc, "orig", None) or exc
        text = str(orig).strip() or orig.__class__.__name__
        path = self.path
        if "readonly" in text or "read-only" in text:
            return "the database is read-only (check the file's and its folder's permissions)"
        if "unable to open" in text:
            folder = path.parent
            if not os.access(folder, os.W_OK):
                return (
                    f"cannot open the database: its folder {folder} is read-only, and SQLite "
                    f"must create {path.name}-wal and {path.name}-shm beside it; use a writable "
                    "folder"
                )
            return "cannot open the database file (check the file's and its folder's permissions)"
        if "disk I/O error" in text:
            return (
                "writing the database failed (disk I/O error): the disk may be full or failing, "
                "or the file may have reached a size limit; fix that and run the same command "
                "again to resume"
            )
        if "locked" in text or "busy" in text:
            return "the database is locked by another process; try again when it has finished"
        if "disk is full" in text or "full" in text:
            return "the disk is full; free space and run the same command again to resume"
        if "not a database" in text or "malformed" in text:
            return "the file is not a batchrun database (or it is damaged)"
        if "no such table" in text or "no such column" in text:
            return f"the database is damaged ({text}); restore it from a copy or start a new one"
        return text


_FEED_CHUNK = 2048  # rows handed over at a time
_ROWS_PER_INSERT = 64  # rows per INSERT statement of a stream (64 x 14 values: within limits)
_FEED_DEPTH = 4  # chunks waiting at most (bounds the memory held between the two threads)


def feed_in_thread(
    consume: Callable[[Iterator[list[Any]]], None], rows: Iterable[Any], chunk: int = _FEED_CHUNK
) -> None:
    """Run ``consume(chunks)`` on a helper thread while this thread produces ``rows``.

    An error on either side stops both and is raised here; the producer's error wins, so a job
    file's own problems are what the caller sees.
    """
    handoff: queue.Queue[list[Any] | None] = queue.Queue(maxsize=_FEED_DEPTH)
    failed: list[BaseException] = []
    stop = threading.Event()

    def chunks() -> Iterator[list[Any]]:
        while (item := handoff.get()) is not None:
            yield item

    def work() -> None:
        try:
            consume(chunks())
        except BaseException as exc:  # handed to the producer, which raises it
            failed.append(exc)
            stop.set()

    def put(item: list[Any] | None) -> None:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    worker = threading.Thread(target=work, name="batchrun-insert", daemon=True)
    worker.start()
    try:
        buf: list[Any] = []
        for row in rows:
            buf.append(row)
            if len(buf) >= chunk:
                put(buf)
                buf = []
                if stop.is_set():
                    break
        if buf:
            put(buf)
    except BaseException:
        stop.set()  # the worker may be waiting for a chunk: the sentinel below ends it
        with contextlib.suppress(queue.Empty):
            while True:
                handoff.get_nowait()
        handoff.put(None)
        worker.join()
        raise
    if not stop.is_set():
        handoff.put(None)
    worker.join()
    if failed:
        raise failed[0]
