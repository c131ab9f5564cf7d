"""The PostgreSQL dialect: URLs, the optional driver, errors in plain words, migrations run by
several runners at once, and claims and recovery under real concurrency."""

from __future__ import annotations

import importlib.util
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from runner.errors import StoreError, UsageError
from runner.store import NewRequest, Store, open_store
from runner.store.api import dialect_for
from runner.store.postgres import PostgreSQL
from runner.store.sqlite import SQLite

WORST = 100


class _Totals:
    def __init__(self, n: int) -> None:
        self.requests = n
        self.input_tokens = self.output_limit_tokens = self.floor_pico = 0
        self.worst_pico = WORST * n


def _rows(n: int) -> list[NewRequest]:
    return [
        NewRequest(i, i + 1, f"id-{i}", "/v1/chat/completions", "gpt-4o-mini", "{}", 10, 5,
                   WORST, 50, False)
        for i in range(n)
    ]  # fmt: skip


def _job(store: Store, n: int, cap: int = 10**12) -> int:
    return store.create_job("/j.jsonl", secrets.token_hex(32), cap, _rows(n), _Totals(n)).id


def _with(url: str, **parts: Any) -> str:
    return make_url(url).set(**parts).render_as_string(hide_password=False)


@pytest.fixture
def schema_url(pg_url: str) -> Iterator[str]:
    """The session's database seen through a schema of its own: an empty batchrun database."""
    name = f"t_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    try:
        url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={name}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {name} CASCADE")


# -- the URL ---------------------------------------------------------------------------------


def test_a_database_url_selects_postgresql_and_a_path_sqlite(tmp_path: Path) -> None:
    for url in ("postgresql://u@h/db", "postgres://u@h:5433/db", "postgresql+psycopg://u@h/db"):
        dialect = dialect_for(url)
        assert isinstance(dialect, PostgreSQL) and dialect.multi_host
        assert dialect.url.drivername == "postgresql+psycopg"
    assert isinstance(dialect_for(str(tmp_path / "b.db")), SQLite)
    for bad, why in [
        ("mysql://u@h/db", "unsupported database URL"),
        ("postgresql+psycopg2://u@h/db", "psycopg 3"),
        ("postgresql://u@h", "names no database"),
    ]:
        with pytest.raises(UsageError, match=why):
            dialect_for(bad)


def test_a_password_in_the_url_is_never_shown() -> None:
    url = "postgresql://batch:hunter2@127.0.0.1:1/jobs"
    assert dialect_for(url).display == "postgresql://batch:***@127.0.0.1:1/jobs"
    with pytest.raises(StoreError) as failed:
        open_store(url)
    assert "hunter2" not in str(failed.value)
    assert "connection refused" in str(failed.value) and "127.0.0.1:1" in str(failed.value)
    with pytest.raises(UsageError) as bad:
        dialect_for("postgresql://batch:hunter2@host:port/jobs")
    assert "hunter2" not in str(bad.value)


def test_without_the_extra_a_database_url_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name)
    )
    with pytest.raises(UsageError, match=r"pip install 'batchrun\[postgres\]'"):
        open_store("postgresql://postgres@127.0.0.1/whatever")


# -- errors in plain words -------------------------------------------------------------------


def test_usual_failures_are_explained(pg_url: str) -> None:
    with pytest.raises(StoreError, match=r"does not exist.*createdb"):
        open_store(_with(pg_url, database=f"nope_{secrets.token_hex(3)}"))
    with pytest.raises(StoreError, match="refused user"):
        open_store(_with(pg_url, username=f"nobody_{secrets.token_hex(3)}"))
    role = f"batchrun_ro_{secrets.token_hex(3)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with pytest.raises(StoreError, match=r"permission denied.*GRANT"):
            open_store(_with(pg_url, username=role, password=None))
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_a_value_postgresql_cannot_store_fails_the_import_in_words(schema_url: str) -> None:
    store = open_store(schema_url)
    rows = _rows(3)
    rows[1].custom_id = "nul\x00byte"
    try:
        with pytest.raises(StoreError, match="NUL character"):
            store.create_job("/j.jsonl", "a" * 64, 10**12, rows, _Totals(3))
        assert store.all_jobs() == []
    finally:
        store.close()


# -- many runners at once --------------------------------------------------------------------


def test_runners_starting_together_on_a_new_database_migrate_it_once(schema_url: str) -> None:
    errors: list[BaseException] = []
    stores: list[Store] = []

    def start() -> None:
        try:
            stores.append(open_store(schema_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert errors == [] and len(stores) == 4


def test_concurrent_claims_never_take_a_request_twice_nor_pass_the_cap(schema_url: str) -> None:
    setup = open_store(schema_url)
    job = _job(setup, 400, cap=150 * WORST)
    setup.close()
    taken: list[list[int]] = []
    errors: list[BaseException] = []

    def runner(i: int) -> None:
        store = open_store(schema_url)
        mine: list[int] = []
        try:
            rid = store.register_runner(job, "h", i, "sync", 30)
            while True:
                claim = store.claim(rid, 7)
                mine += [r.id for r in claim.requests]
                if not claim.requests:
                    break
        except BaseException as exc:
            errors.append(exc)
        finally:
            taken.append(mine)
            store.close()

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    every = [r for mine in taken for r in mine]
    assert len(every) == len(set(every)) == 150  # exactly what fits, each once
    assert sum(1 for mine in taken if mine) > 1  # they really did share the work


def test_recovery_leaves_the_claims_of_a_runner_that_joined_meanwhile(schema_url: str) -> None:
    """A runner registering and claiming while another recovers the dead is not taken for dead
    (the recovering runner saw the live runners before it registered)."""
    store, other = open_store(schema_url), open_store(schema_url)
    try:
        job = _job(store, 10)
        dead = store.register_runner(job, "h", 1, "sync", 30)
        store.claim(dead, 2)
        joined: list[int] = []

        def alive(pid: int) -> bool:  # called inside the recovery, after it listed runners
            if not joined:
                rid = other.register_runner(job, "elsewhere", 2, "sync", 30)
                joined.append(len(other.claim(rid, 3).requests))
            return pid != 1

        assert store.recover(job, "h", alive) == (2, 2 * WORST)
        assert joined == [3]
        assert store.state_counts(job) == {"pending": 7, "reserved": 3}
        assert store.spend(job).reserved_pico == 3 * WORST
    finally:
        store.close()
        other.close()


def test_runners_on_machines_with_different_clocks_agree_on_expiry(
    schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats and their expiry are on the database's clock, not the machines'."""
    store = open_store(schema_url)
    try:
        job = _job(store, 3)
        runner = store.register_runner(job, "far", 1, "sync", 30)
        store.claim(runner, 1)
        monkeypatch.setattr("time.time", lambda: 4_000_000_000.0)  # this machine is years ahead
        assert store.recover(job, "here", lambda pid: True) == (0, 0)
        assert [r.id for r in store.live_runners(job)] == [runner]
    finally:
        store.close()


def test_a_database_of_schema_0001_is_upgraded_with_its_books(schema_url: str) -> None:
    """The migrations run on PostgreSQL too, data and all (0002 computes the books)."""
    from alembic import command

    from runner.store.migrate import _config

    engine = PostgreSQL(schema_url).create_engine()
    with engine.begin() as conn:
        cfg = _config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.exec_driver_sql(
            "INSERT INTO jobs VALUES (1, '/x.jsonl', 'x', 0, 0, 1000000000000, 'stopped', 2, "
            "20, 10, 200, 400, 'host:1:ab', 0)"
        )
        for rid, state, reserved in ((1, "done", 0), (2, "reserved", 200)):
            conn.exec_driver_sql(
                "INSERT INTO requests VALUES (%s, 1, %s, %s, %s, '/v1/chat/completions', "
                "'gpt-4o-mini', '{}', 10, 5, 200, 100, false, %s, 1, %s, NULL)",
                (rid, rid - 1, rid, f"c{rid}", state, reserved),
            )
        conn.exec_driver_sql("INSERT INTO ledger VALUES (1, 1, 1, 'result', 500, 0)")
        for table in ("jobs", "requests", "ledger"):  # as if batchrun had numbered the rows
            conn.exec_driver_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), MAX(id)) FROM {table}"
            )
    engine.dispose()
    store = open_store(schema_url)
    try:
        spend, cap = store.books(1)
        assert (spend.settled_pico, spend.reserved_pico, cap) == (500, 200, 10**12)
        assert store.recover(1, "h", lambda pid: True) == (1, 200)
    finally:
        store.close()
