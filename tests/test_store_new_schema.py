"""A new SQLite database gets the head schema from the metadata, without Alembic: it must be
the very schema the migrations build (columns in order, types, defaults, keys, indexes)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from runner.store import migrate, open_store
from runner.store.schema import metadata


def _schema(db: Path) -> dict[str, Any]:
    """Everything SQLite knows of the schema, per table, in its own words."""
    conn = sqlite3.connect(db)
    try:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        out: dict[str, Any] = {
            "indexes sql": sorted(
                conn.execute(
                    "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' "
                    "AND sql IS NOT NULL"
                ).fetchall()
            ),
            "version": conn.execute("SELECT version_num FROM alembic_version").fetchall(),
        }
        for t in tables:
            indexes = sorted(conn.execute(f"PRAGMA index_list('{t}')").fetchall(), key=str)
            out[t] = {
                "columns": conn.execute(f"PRAGMA table_xinfo('{t}')").fetchall(),
                "foreign keys": conn.execute(f"PRAGMA foreign_key_list('{t}')").fetchall(),
                # autoindex names depend on creation order; what they index does not
                "indexes": sorted(
                    (
                        unique,
                        origin,
                        partial,
                        conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall(),
                        name if not name.startswith("sqlite_autoindex") else "",
                    )
                    for _seq, name, unique, origin, partial in indexes
                ),
            }
        return out
    finally:
        conn.close()


def _by_alembic(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(migrate, "_create_new", lambda store: False)
        open_store(db).close()


def test_a_new_sqlite_database_has_exactly_the_schema_the_migrations_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, migrated = tmp_path / "fast.db", tmp_path / "migrated.db"
    open_store(fast).close()
    _by_alembic(migrated, monkeypatch)
    assert _schema(fast) == _schema(migrated)
    assert _schema(fast)["version"] == [(migrate.SCHEMA_HEAD,)]
    for db in (fast, migrated):
        store = open_store(db)  # at head: opens without migrating
        try:
            with store.engine.connect() as conn:
                assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        finally:
            store.close()


def test_a_new_database_is_made_without_loading_alembic(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    code = (
        "import sys; from runner.store import open_store; "
        f"open_store({str(db)!r}).close(); print('alembic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrate.SCHEMA_HEAD,)
        ]


def test_runners_opening_a_new_database_together_make_it_once(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            open_store(db).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrate.SCHEMA_HEAD,)
        ]


def test_a_file_with_other_tables_is_still_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    with pytest.raises(Exception, match="not batchrun's"):
        open_store(db)
    with sqlite3.connect(db) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert names == ["notes"]
