"""What every part of the store shares: the engine, the dialect, and transactions whose
database errors come out as ``StoreError`` with a message a user can act on."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..clock import Clock
from ..errors import StoreError


class Dialect(Protocol):
    """The database-specific plumbing a store runs on (``sqlite.SQLite``, ...)."""

    name: str
    display: str  # how the database is named in messages (a path, or a URL without password)
    multi_host: bool  # whether runners on other machines can share it

    def create_engine(self, *, readonly: bool = False, create: bool = True) -> Engine:
        """``create=False``: the database must exist already (commands that name a job in
        it); a mistyped path is an error, not a new empty database."""
        ...

    def writing(self, engine: Engine) -> contextlib.AbstractContextManager[Connection]: ...

    def reading(self, engine: Engine) -> contextlib.AbstractContextManager[Connection]: ...

    def check_present(self) -> None: ...

    def is_foreign(self, engine: Engine) -> bool: ...

    def lock_schema(self, conn: Connection) -> None: ...

    def now(self, conn: Connection) -> float: ...

    def retryable(self, exc: BaseException) -> bool: ...

    def insert_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        stream: bool = False,
    ) -> None: ...

    def update_many(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        same: dict[str, Any] | None = None,
    ) -> None: ...

    def describe(self, exc: BaseException) -> str: ...


P = ParamSpec("P")
R = TypeVar("R")
_ATTEMPTS = 4
# How long a store call waits for a database server that dropped its connection (restarted,
# failed over, an administrator's kill) before the run stops: about a server restart.
RECONNECT_SECONDS = 30.0


class ConflictError(StoreError):
    """The database aborted a transaction to resolve a conflict (a deadlock, a serialization
    failure); it wrote nothing and may simply run again."""


class DisconnectedError(StoreError):
    """The connection to the database server was lost before the transaction's COMMIT was
    sent: the server rolled it back, so it wrote nothing and may run again on a new
    connection (see ``AmbiguousCommitError`` for a COMMIT cut off on its way)."""


class AmbiguousCommitError(StoreError):
    """The connection to the database server was lost while the COMMIT was on its way: the
    transaction may or may not have been written. A call that can look (``claim``,
    ``record``) or may run twice (``idempotent``) goes on; for the others the run stops."""


def idempotent(fn: Callable[P, R]) -> Callable[P, R]:
    """A store call that may run twice (a heartbeat, a retirement): when its COMMIT lost the
    connection it simply runs again, under ``retry_conflicts`` (put that one outside)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AmbiguousCommitError as exc:
            raise DisconnectedError(str(exc)) from None

    return wrapper


def retry_conflicts(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a store call again when its transaction lost a conflict (PostgreSQL), a few times,
    or lost its connection before committing, for up to ``RECONNECT_SECONDS``."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        conflicts = reconnects = 0
        deadline: float | None = None
        while True:
            try:
                return fn(*args, **kwargs)
            except ConflictError:
                conflicts += 1
                if conflicts == _ATTEMPTS:
                    raise
                time.sleep(0.01 * 2 ** (conflicts - 1))
            except DisconnectedError:
                now = time.monotonic()
                deadline = deadline or now + RECONNECT_SECONDS
                if now >= deadline:
                    raise
                time.sleep(min(0.05 * 2 ** min(reconnects, 6), 2.0, deadline - now))
                reconnects += 1

    return wrapper


class StoreBase:
    """The engine and the transaction helpers; see ``Store`` for the API."""

    def __init__(self, engine: Engine, dialect: Dialect, readonly: bool = False) -> None:
        self.engine = engine
        self.dialect = dialect
        self.readonly = readonly
        # The run's clock when one was given (tests move it across a budget period, or run it
        # on virtual time): what this process records as now, runners' heartbeats and expiry,
        # and which budget period a claim falls in. Without one, this machine's clock for what
        # it records, and the database's for heartbeats and periods (every runner of a server
        # agrees on it). Runners of one job given clocks must be given the same one.
        self.clock: Clock | None = None

    def now(self) -> float:
        """Now, in epoch seconds, on this process's clock."""
        return self.clock.now() if self.clock is not None else time.time()

    def wall_clock(self, conn: Connection) -> float:
        """Now, in epoch seconds, as heartbeats and budget periods count it."""
        return self.clock.now() if self.clock is not None else self.dialect.now(conn)

    @property
    def name(self) -> str:
        return self.dialect.display

    def error(self, exc: BaseException, committing: bool = True) -> StoreError:
        kind = StoreError
        if self.dialect.retryable(exc):
            kind = ConflictError
        elif getattr(exc, "connection_invalidated", False):
            kind = AmbiguousCommitError if committing else DisconnectedError
        return kind(f"{self.dialect.display}: {self.dialect.describe(exc)}")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """One write transaction; database errors become StoreErrors, nothing half-written."""
        if self.readonly:
            raise StoreError(f"{self.dialect.display}: opened read-only")
        committing = False
        try:
            with self.dialect.writing(self.engine) as conn:
                yield conn
                committing = True  # the body is done: what fails now may have committed
        except sa.exc.SQLAlchemyError as exc:
            raise self.error(exc, committing) from None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """One read transaction: its queries see one snapshot, however busy the writers;
        database errors become StoreErrors."""
        try:
            with self.dialect.reading(self.engine) as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise self.error(exc) from None

    def close(self) -> None:
        self.engine.dispose()
