"""Bring a database to the schema this batchrun writes, through Alembic, or say why not."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ..errors import StoreError
from .base import StoreBase

MIGRATIONS_PACKAGE = "runner.migrations"


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files(MIGRATIONS_PACKAGE)))
    return cfg


def check_schema(store: StoreBase, *, upgrade: bool) -> None:
    """Upgrade the schema to head (``upgrade``), or only check that it is there.

    Refuses a newer schema, and a database holding another program's tables: batchrun never
    writes its tables into a file it did not create.
    """
    cfg = _config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    with store.reading() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return
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
            f"{name}: this database was written by an older batchrun (schema {current}); any "
            "`batchrun run` with this --db upgrades it"
        )
    with store.writing() as conn:
        # Runners starting together on a new database: one migrates, the others find it done
        # (Alembic reads the version again inside this transaction).
        store.dialect.lock_schema(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
