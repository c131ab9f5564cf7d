"""What every part of the store shares: the engine, the dialect, and transactions whose
database errors come out as ``StoreError`` with a message a user can act on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import StoreError


class Dialect(Protocol):
    """The database-specific plumbing a store runs on (``sqlite.SQLite``, ...)."""

    name: str
    display: str  # how the database is named in messages (a path, or a URL without password)
    multi_host: bool  # whether runners on other machines can share it

    def create_engine(self, *, readonly: bool = False) -> Engine: ...

    def writing(self, engine: Engine) -> contextlib.AbstractContextManager[Connection]: ...

    def check_present(self) -> None: ...

    def is_foreign(self, engine: Engine) -> bool: ...

    def describe(self, exc: BaseException) -> str: ...


class StoreBase:
    """The engine and the transaction helpers; see ``Store`` for the API."""

    def __init__(self, engine: Engine, dialect: Dialect, readonly: bool = False) -> None:
        self.engine = engine
        self.dialect = dialect
        self.readonly = readonly

    @property
    def name(self) -> str:
        return self.dialect.display

    def error(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.dialect.display}: {self.dialect.describe(exc)}")

    @contextlib.contextmanager
    def writing(self) -> Iterator[Connection]:
        """One write transaction; database errors become StoreErrors, nothing half-written."""
        if self.readonly:
            raise StoreError(f"{self.dialect.display}: opened read-only")
        try:
            with self.dialect.writing(self.engine) as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise self.error(exc) from None

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """A read-only connection; database errors become StoreErrors."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise self.error(exc) from None

    def close(self) -> None:
        self.engine.dispose()
