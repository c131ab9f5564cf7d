"""The store: schema by Alembic, private WAL files, a newer schema refused, exact ledger."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from runner.errors import StoreError
from runner.store import NewRequest, PendingRequest, ResultRecord, Store, metadata


def _totals(n: int) -> object:
    class T:
        requests = n
        input_tokens = 10 * n
        output_limit_tokens = 5 * n
        floor_pico = 100 * n
        worst_pico = 200 * n

    return T()


def _rows(n: int) -> list[NewRequest]:
    return [
        NewRequest(i, i + 1, f"id-{i}", "/v1/chat/completions", "gpt-4o-mini", "{}", 10, 5, 200,
                   100, False)
        for i in range(n)
    ]


def test_a_new_database_is_private_in_wal_mode_and_at_the_migration_head(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "b.db"
    Store.open(db).close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"


def test_the_migrations_build_exactly_the_schema_the_code_queries(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "b.db")
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    store.close()
    assert diff == []


def test_a_database_from_a_newer_batchrun_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer batchrun"):
        Store.open(db)


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    db.write_text("hello, I am a text file" * 100)
    with pytest.raises(StoreError, match="not a batchrun database"):
        Store.open(db)


def test_importing_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "b.db")

    def failing() -> object:
        yield from _rows(3000)
        raise RuntimeError("the job file turned out to be invalid")

    with pytest.raises(RuntimeError):
        store.create_job("/x.jsonl", "a" * 64, 10**12, failing(), _totals(3000))
    assert store.all_jobs() == []
    job = store.create_job("/x.jsonl", "a" * 64, 10**12, _rows(3000), _totals(3000))
    assert job.requests == 3000 and job.worst_pico == 600_000
    store.close()


def test_reservations_left_by_a_dead_run_become_worst_case_charges(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "b.db")
    job = store.create_job("/x.jsonl", "b" * 64, 10**12, _rows(10), _totals(10))
    pending = store.next_pending(job.id, -1, 4)
    store.reserve(pending)
    assert store.spend(job.id).reserved_pico == 4 * 200
    # one of them finished and was recorded before the "crash"
    done: PendingRequest = pending[0]
    store.record(job.id, [], [], [ResultRecord(done.id, "done", 1, 200, "{}", "m", "req_1",
                                                10, 0, 3, 0, 77, 5, 0.0)], [])
    count, pico = store.recover_orphans(job.id)
    assert (count, pico) == (3, 600)
    spend = store.spend(job.id)
    assert spend.settled_pico == 77 + 600 and spend.reserved_pico == 0
    assert len(store.next_pending(job.id, -1, 100)) == 9
    store.close()


def test_fits_under_counts_pending_requests_in_file_order(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "b.db")
    job = store.create_job("/x.jsonl", "c" * 64, 10**12, _rows(10), _totals(10))
    assert store.fits_under(job.id, 0) == 0
    assert store.fits_under(job.id, 199) == 0
    assert store.fits_under(job.id, 200) == 1
    assert store.fits_under(job.id, 1000) == 5
    assert store.fits_under(job.id, 10**9) == 10
    store.close()
