"""The Store: one open database, and how to open one."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .base import Dialect
from .batches import BatchesMixin
from .budgets import BudgetsMixin
from .claims import ClaimsMixin
from .jobs import JobsMixin
from .migrate import check_schema
from .postgres import PostgreSQL, is_url
from .reads import ReadsMixin
from .sqlite import SQLite
from .timeline import TimelineMixin


class Store(BudgetsMixin, JobsMixin, BatchesMixin, ClaimsMixin, ReadsMixin, TimelineMixin):
    """One open database. Use :func:`open_store`."""


def dialect_for(target: str | Path) -> Dialect:
    """The dialect for a ``--db`` value: a file path (SQLite) or a database URL
    (``postgresql://user@host/dbname``: PostgreSQL)."""
    if isinstance(target, str) and is_url(target):
        return PostgreSQL(target)
    if isinstance(target, str) and "://" in target:
        scheme = target.split("://", 1)[0]
        raise UsageError(
            f"--db: unsupported database URL scheme {scheme!r}: give a file path (SQLite) or a "
            "postgresql://user@host/dbname URL"
        )
    return SQLite(Path(target))


def open_store(target: str | Path, *, readonly: bool = False, create: bool = True) -> Store:
    """Open a database. Writers create (unless ``create=False``) and migrate it; ``readonly``
    opens an existing batchrun database without changing anything (and refuses one that would
    need migrating)."""
    dialect = dialect_for(target)
    engine = dialect.create_engine(readonly=readonly, create=create)
    store = Store(engine, dialect, readonly=readonly)
    try:
        check_schema(store, upgrade=not readonly)
    except BaseException:
        store.close()
        raise
    return store
