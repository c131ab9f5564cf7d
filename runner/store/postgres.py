"""PostgreSQL plumbing: the URL, the driver (psycopg 3), COPY, and errors in plain words.

A PostgreSQL database is what lets runners on several machines share one job: claims lock rows
(``FOR UPDATE SKIP LOCKED``), the cap check locks the job's row, and runners read the server's
clock, so machines whose clocks disagree still agree on whose heartbeat has expired.
Transactions run at READ COMMITTED; every one that moves money locks the job's row first or
last (see ``claims``), so they serialize where they must and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

from ..errors import UsageError

SCHEMES = ("postgresql", "postgres")  # what --db accepts, optionally as postgresql+psycopg
EXTRA = "pip install 'batchrun[postgres]'"
CONNECT_TIMEOUT_S = 10
# A client stopped mid-transaction (Ctrl-Z, a hung machine) must not hold the job's row
# forever: the server ends such a session after this long.
IDLE_IN_TRANSACTION_MS = 60_000
_MIGRATION_LOCK = 0x62617463  # pg_advisory_xact_lock key: one migration at a time
# Binary COPY needs each column's wire type.
_COPY_TYPES: dict[type, str] = {
    sa.BigInteger: "int8",
    sa.Integer: "int4",
    sa.Boolean: "bool",
    sa.Float: "float8",
    sa.Text: "text",
    sa.String: "text",
}
# Conflicts PostgreSQL resolves by aborting one transaction, which may simply run again.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


def is_url(target: object) -> bool:
    """Whether a ``--db`` value names a PostgreSQL database rather than a file."""
    text = str(target)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.split("+", 1)[0].lower() in SCHEMES


def _copy_type(column: sa.Column[Any]) -> str:
    for kind, name in _COPY_TYPES.items():
        if isinstance(column.type, kind):
            return name
    raise TypeError(f"no COPY type for column {column.name} ({column.type})")


class PostgreSQL:
    """One PostgreSQL database, named by a URL such as ``postgresql://user@host/dbname``."""

    name = "postgresql"
    multi_host = True  # runners on any machine that reaches the server can share a job

    def __init__(self, target: str) -> None:
        try:
            url = make_url(target)
        except (sa.exc.ArgumentError, ValueError):  # the message may repeat the password
            raise UsageError(
                "--db: not a valid database URL (expected postgresql://user[:password]@host"
                "[:port]/dbname)"
            ) from None
        backend, _, driver = url.drivername.partition("+")
        if driver not in ("", "psycopg"):
            raise UsageError(
                f"--db: batchrun talks to PostgreSQL through psycopg 3; use a "
                f"postgresql://... URL (not {backend}+{driver})"
            )
        if not url.database:
            raise UsageError(
                "--db: the URL names no database; add it, e.g. postgresql://user@host/batchrun"
            )
        self.url: URL = url.set(drivername="postgresql+psycopg")
        self.display = url.set(drivername="postgresql").render_as_string(hide_password=True)

    # -- connecting -------------------------------------------------------------------------

    def create_engine(self, *, readonly: bool = False, create: bool = True) -> Engine:
        # ``create`` changes nothing here: batchrun never creates a PostgreSQL database.
        if importlib.util.find_spec("psycopg") is None:
            raise UsageError(
                f"--db {self.display}: PostgreSQL support is an extra; install it with: {EXTRA}"
            )
        query = dict(self.url.query)
        options = [f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}"]
        if readonly:
            options.append("-c default_transaction_read_only=on")
        if "options" in query:
            options.append(str(query.pop("options")))
        connect_args: dict[str, Any] = {"options": " ".join(options)}
        if "connect_timeout" not in query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        if "application_name" not in query:
            connect_args["application_name"] = "batchrun"
        return sa.create_engine(
            self.url.set(query=query),
            connect_args=connect_args,
            pool_pre_ping=True,  # a server restarted between two writes: reconnect, not fail
            pool_size=2,
            max_overflow=4,
        )

    @contextlib.contextmanager
    def writing(self, engine: Engine) -> Iterator[Connection]:
        """A write transaction at READ COMMITTED; rows are locked by the statements."""
        with engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def reading(self, engine: Engine) -> Iterator[Connection]:
        """A REPEATABLE READ transaction: every query of a status or an export sees the same
        snapshot while runners commit (READ COMMITTED gives each statement its own)."""
        with engine.connect() as conn:
            conn.execution_options(isolation_level="REPEATABLE READ")
            yield conn

    def check_present(self) -> None:
        """A server database cannot vanish under an open connection unnoticed."""

    def is_foreign(self, engine: Engine) -> bool:
        """Whether the database's schema holds tables but is not a batchrun database."""
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
        return bool(names) and "alembic_version" not in names

    def lock_schema(self, conn: Connection) -> None:
        """Runners starting together on a new database migrate it one at a time."""
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})

    def now(self, conn: Connection) -> float:
        """The server's clock (epoch seconds): the one clock every runner's machine shares."""
        return float(conn.execute(sa.text("SELECT extract(epoch FROM clock_timestamp())")).scalar())

    def retryable(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None)
        return getattr(orig, "sqlstate", None) in RETRYABLE_SQLSTATES

    # -- bulk ---------------------------------------------------------------------------------

    def insert_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        stream: bool = False,
    ) -> None:
        """Copy rows into ``table`` with one binary COPY, in the open transaction.

        ``stream`` (a job's requests): a queued writer sends the data from its own thread, so
        the server inserts while the caller produces the next rows (the server process works
        on another core).
        """
        import psycopg
        from psycopg.copy import QueuedLibpqWriter

        raw = conn.connection.dbapi_connection
        assert raw is not None
        types = [_copy_type(table.c[name]) for name in columns]
        sql = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        try:
            with (
                raw.cursor() as cur,  # type: ignore[attr-defined]
                cur.copy(sql, writer=QueuedLibpqWriter(cur) if stream else None) as copy,
            ):
                copy.set_types(types)
                write = copy.write_row
                for row in rows:
                    write(row)
        except psycopg.Error as exc:  # the driver's own error: as SQLAlchemy would raise it
            raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg.Error) from None
        except (TypeError, ValueError) as exc:  # a value the driver cannot send at all
            raise sa.exc.StatementError(str(exc), sql, None, exc) from None

    def update_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        same: dict[str, Any] | None = None,
    ) -> None:
        """``UPDATE table SET columns[1:] (and ``same``) WHERE columns[0] = ...`` for every
        row, in one statement: the rows travel as one array per column."""
        import psycopg

        if not rows:
            return
        same = same or {}
        key = columns[0]
        sets = [f"{c} = v.{c}" for c in columns[1:]] + [f"{c} = %s" for c in same]
        arrays = ", ".join(f"%s::{_copy_type(table.c[c])}[]" for c in columns)
        sql = (
            f"UPDATE {table.name} AS t SET {', '.join(sets)} FROM unnest({arrays}) "
            f"AS v({', '.join(columns)}) WHERE t.{key} = v.{key}"
        )
        # The SET clause's own values come first in the statement, unnest()'s arrays after.
        params = [*same.values(), *(list(col) for col in zip(*rows, strict=True))]
        raw = conn.connection.dbapi_connection
        assert raw is not None
        try:
            with raw.cursor() as cur:  # type: ignore[attr-defined]
                cur.execute(sql, params)
        except psycopg.Error as exc:
            raise sa.exc.DBAPIError.instance(sql, None, exc, psycopg.Error) from None

    # -- errors -------------------------------------------------------------------------------

    def describe(self, exc: BaseException) -> str:
        """A PostgreSQL error in words a user can act on."""
        orig = getattr(exc, "orig", None) or exc
        state = getattr(orig, "sqlstate", None) or ""
        text = str(orig).strip() or orig.__class__.__name__
        first = text.splitlines()[0]
        url = self.url
        where = f"{url.host or 'localhost'}:{url.port or 5432}"
        user = url.username or "(the default user)"
        if "password authentication failed" in text or "no password supplied" in text:
            return (
                f"authentication failed for user {user}: check the user and password (in the "
                "URL, PGPASSWORD or ~/.pgpass)"
            )
        if state == "28000" or ("role" in text and "does not exist" in text):
            return (
                f"the server at {where} refused user {user} ({_fatal(text)}); check the user "
                "in the URL and the server's pg_hba.conf"
            )
        if state == "3D000" or ("database" in text and "does not exist" in text):
            return (
                f"database {url.database!r} does not exist on {where}; create it first "
                f"(createdb -h {url.host or 'localhost'} {url.database}, or CREATE DATABASE "
                f"{url.database}) and run again"
            )
        if "Connection refused" in text or "could not connect" in text:
            return (
                f"cannot connect to the PostgreSQL server at {where} (connection refused): is "
                "it running and accepting TCP connections there?"
            )
        if "failed to resolve host" in text or "could not translate host name" in text:
            return f"cannot connect: unknown host {url.host!r}"
        if "timeout expired" in text or "timed out" in text:
            return f"cannot connect to the PostgreSQL server at {where}: it did not answer in time"
        if state == "42501" or "permission denied" in text:
            return (
                f"permission denied ({first}): user {user} needs to create tables in the "
                "database's schema (GRANT CREATE ON SCHEMA ...) and to read and write batchrun's "
                "tables"
            )
        if state == "25006" or "read-only transaction" in text:
            return "the database is read-only here (a standby, or a read-only user)"
        if state in ("53100", "53200") or "No space left" in text:
            return (
                f"the database server is out of space or memory ({first}); fix that and run "
                "the same command again to resume"
            )
        if state in RETRYABLE_SQLSTATES:
            return f"a conflict with another batchrun process ({first}); run again"
        if state.startswith("57P") or "server closed the connection" in text:
            return (
                f"the connection to the server at {where} was lost ({first}); run the same "
                "command again to resume when it is back"
            )
        if "0x00" in text:
            return "a value contains a NUL character, which PostgreSQL cannot store"
        if state in ("42P01", "42703"):
            return f"the database is damaged ({first}); restore it from a copy or start a new one"
        return first


def _fatal(text: str) -> str:
    """The server's own reason from a libpq connection error (after 'FATAL:')."""
    _, _, reason = text.partition("FATAL:")
    return reason.strip().splitlines()[0] if reason.strip() else text.splitlines()[0]
