"""Bring a database to the schema this batchrun writes, through Alembic, or say why not.

A database already at ``SCHEMA_HEAD`` is recognised with one query, without loading Alembic:
that is every start but the first after an upgrade. A new, empty SQLite file is given the head
schema straight from the metadata and stamped, without loading Alembic either (its import and
the migrations were most of a first run's opening of the store: bench/RESULTS.md); a test keeps
that schema the one the migrations build. Anything else (an older schema, PostgreSQL) goes
through Alembic.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import sqlalchemy as sa

from ..errors import StoreError
from .base import StoreBase

MIGRATIONS_PACKAGE = "runner.migrations"
SCHEMA_HEAD = "0004"  # the newest migration in migrations/versions (a test keeps them equal)


def _recorded(store: StoreBase) -> list[str] | None:
    """The versions in ``alembic_version``, or None when the table does not exist."""
    with store.reading() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return [str(v) for (v,) in conn.execute(sa.text("SELECT version_num FROM alembic_version"))]


def _create_new(store: StoreBase) -> bool:
    """Give a new SQLite file the head schema and stamp it; False if it is not empty after all
    (another runner got there first, or it holds tables: Alembic's path then decides)."""
    from .schema import metadata

    with store.writing() as conn:  # BEGIN IMMEDIATE: runners starting together queue here
        if sa.inspect(conn).get_table_names():
            return False
        metadata.create_all(conn, checkfirst=False)
        version = sa.Table(
            "alembic_version",  # as Alembic creates it
            sa.MetaData(),
            sa.Column("version_num", sa.String(32), nullable=False),
            sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
        )
        version.create(conn)
        conn.execute(version.insert().values(version_num=SCHEMA_HEAD))
    return True


def _damaged(store: StoreBase, why: object) -> StoreError:
    return StoreError(
        f"{store.name}: the database is damaged ({why}); restore it from a copy or start a new one"
    )


def _config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files(MIGRATIONS_PACKAGE)))
    return cfg


def check_schema(store: StoreBase, *, upgrade: bool) -> None:
    """Upgrade the schema to head (``upgrade``), or only check that it is there.

    Refuses a newer schema, and a database holding another program's tables: batchrun never
    writes its tables into a file it did not create.
    """
    recorded = _recorded(store)
    if recorded == [SCHEMA_HEAD]:
        return
    if recorded is not None and len(recorded) != 1:
        raise _damaged(store, f"{len(recorded)} schema versions recorded")
    if recorded is None and upgrade and store.dialect.name == "sqlite" and _create_new(store):
        return
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    current = recorded[0] if recorded else None
    name = store.name
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise StoreError(
            f"{name}: this database was written by a newer batchrun (schema {current}); "
            "upgrade batchrun to use it"
        )
    if current is None and store.dialect.is_foreign(store.engine):
        raise StoreError(
            f"{name}: this database holds tables that are not batchrun's; pass --db with a new "
            "file (or an empty database)"
        )
    if not upgrade:
        if current is None:
            raise StoreError(f"{name}: not a batchrun database (no jobs have been run with it)")
        raise StoreError(
            f"{name}: this database was written by an older batchrun (schema {current}); "
            f"`batchrun upgrade --db {name}` brings it up to date"
        )
    with store.writing() as conn:
        # Runners starting together on a new database: one migrates, the others find it done
        # (Alembic reads the version again inside this transaction).
        store.dialect.lock_schema(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def migration_head() -> str:
    """The newest migration, as Alembic reads it from the scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head
