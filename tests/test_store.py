"""The store: schema by Alembic, claims under the cap, group-committed outcomes, runners."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from runner.errors import RunnerLostError, StoreError
from runner.store import (
    AttemptRecord,
    ChargeRecord,
    NewRequest,
    Outcomes,
    ReleaseRecord,
    RequestState,
    ResultFlag,
    ResultRecord,
    Store,
    open_store,
)
from runner.store.schema import metadata

WORST = 200


class _Totals:
    def __init__(self, n: int) -> None:
        self.requests = n
        self.input_tokens = 10 * n
        self.output_limit_tokens = 5 * n
        self.floor_pico = 100 * n
        self.worst_pico = WORST * n


def _rows(n: int, url: str = "/v1/chat/completions") -> list[NewRequest]:
    return [
        NewRequest(i, i + 1, f"id-{i}", url, "gpt-4o-mini", "{}", 10, 5, WORST, 100, False,
                   batch_worst_pico=WORST // 2)
        for i in range(n)
    ]  # fmt: skip


def _job(store: Store, n: int = 10, cap: int = 10**12, sha: str = "a") -> int:
    return store.create_job(f"/{sha}.jsonl", sha * 64, cap, _rows(n), _Totals(n)).id


def _result(rid: int, cost: int, reserved: int = WORST, **kw: object) -> ResultRecord:
    values: dict[str, object] = dict(
        request_id=rid, state=RequestState.DONE, attempts=1, status_code=200, body="{}",
        response_model="m", api_request_id="req_1", prompt_tokens=10, cached_tokens=0,
        completion_tokens=3, reasoning_tokens=0, cost_pico=cost, latency_ms=5, finished_at=0.0,
        reserved_pico=reserved,
    )  # fmt: skip
    values.update(kw)
    return ResultRecord(**values)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A new database of each dialect (PostgreSQL: the session's database, emptied)."""
    if request.param == "sqlite":
        s = open_store(tmp_path / "b.db")
    else:
        s = open_store(request.getfixturevalue("pg_url"))
    yield s  # type: ignore[misc]
    s.close()


def test_a_new_database_is_private_in_wal_mode_and_at_the_migration_head(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "b.db"
    open_store(db).close()
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0004"


def test_the_migrations_build_exactly_the_schema_the_code_queries(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_a_database_from_a_newer_batchrun_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    open_store(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(StoreError, match="newer batchrun"):
        open_store(db)


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    db.write_text("hello, I am a text file" * 100)
    with pytest.raises(StoreError, match="not a batchrun database"):
        open_store(db)


def test_another_programs_database_is_never_written_into(tmp_path: Path) -> None:
    db = tmp_path / "theirs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = db.read_bytes()
    with pytest.raises(StoreError, match="not batchrun's"):
        open_store(db)
    with pytest.raises(StoreError, match="not batchrun's"):
        open_store(db, readonly=True)
    assert db.read_bytes() == before


def test_reading_never_migrates(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    with pytest.raises(StoreError, match="no such database"):
        open_store(db, readonly=True)
    sqlite3.connect(db).close()  # an empty file
    with pytest.raises(StoreError, match="not a batchrun database"):
        open_store(db, readonly=True)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_importing_is_all_or_nothing(store: Store) -> None:
    def failing() -> object:
        yield from _rows(3000)
        raise RuntimeError("the job file turned out to be invalid")

    with pytest.raises(RuntimeError):
        store.create_job("/x.jsonl", "a" * 64, 10**12, failing(), _Totals(3000))
    assert store.all_jobs() == []

    def changed() -> None:
        raise StoreError("the file changed while it was read")

    with pytest.raises(StoreError):
        store.create_job("/x.jsonl", "a" * 64, 1, _rows(5), _Totals(5), before_commit=changed)
    assert store.all_jobs() == []
    job = store.create_job("/x.jsonl", "a" * 64, 10**12, _rows(3000), _Totals(3000))
    assert job.requests == 3000 and job.worst_pico == 600_000


def test_a_claim_takes_pending_requests_in_file_order_only_while_they_fit(store: Store) -> None:
    job = _job(store, cap=5 * WORST + 50)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    claim = store.claim(runner, 3)
    assert [r.seq for r in claim.requests] == [0, 1, 2] and not claim.blocked
    claim = store.claim(runner, 3)
    assert [r.seq for r in claim.requests] == [3, 4] and claim.blocked
    assert store.spend(job).reserved_pico == 5 * WORST
    assert store.claim(runner, 3).requests == []


def test_a_batch_claim_reserves_batch_prices(store: Store) -> None:
    job = _job(store, cap=WORST)
    runner = store.register_runner(job, "h", 1, "batch", 30)
    claim = store.claim(runner, 5, batch=True)
    assert len(claim.requests) == 2 and claim.requests[0].worst_pico == WORST // 2


def test_two_runners_never_share_the_same_headroom(store: Store) -> None:
    job = _job(store, cap=3 * WORST)
    a = store.register_runner(job, "h", 1, "sync", 30)
    b = store.register_runner(job, "h", 2, "sync", 30)
    got = store.claim(a, 2).requests + store.claim(b, 2).requests + store.claim(a, 2).requests
    assert len(got) == 3 and len({r.id for r in got}) == 3


def test_outcomes_settle_reservations_into_the_ledger_in_one_commit(store: Store) -> None:
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    a, b, _ = store.claim(runner, 3).requests
    spend = store.record(
        runner,
        Outcomes(
            attempts=[AttemptRecord(a.id, 1, 0.0, 5, 200, None)],
            charges=[ChargeRecord(b.id, WORST, 0.0)],
            results=[_result(a.id, 77)],
            releases=[ReleaseRecord(b.id, 1, "timed out", WORST)],
        ),
    )
    assert (spend.settled_pico, spend.reserved_pico) == (77 + WORST, WORST)  # c still held
    counts = store.state_counts(job)
    assert counts == {"done": 1, "pending": 8, "reserved": 1}


def test_a_row_the_database_refuses_does_not_lose_the_others(store: Store) -> None:
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    reqs = store.claim(runner, 3).requests
    bad = _result(reqs[1].id, 50, body={"not": "text"})  # a value no driver can bind
    store.record(runner, Outcomes(results=[_result(reqs[0].id, 40), bad, _result(reqs[2].id, 30)]))
    assert store.spend(job).settled_pico == 120
    status = store.status(job)
    assert status.states["done"] == 3
    rows = list(store.iter_export(job))
    assert rows[1].body is None and rows[1].error_code == "unstorable"


def test_claims_of_a_dead_runner_are_charged_at_worst_case_and_queued_again(
    store: Store,
) -> None:
    job = _job(store)
    dead = store.register_runner(job, "h", 1, "sync", ttl=-1)  # expired at once
    pending = store.claim(dead, 4).requests
    store.record(dead, Outcomes(results=[_result(pending[0].id, 77)]))
    live = store.register_runner(job, "h", 2, "sync", 30)
    assert store.recover(job, "h", lambda pid: True) == (3, 3 * WORST)
    spend = store.spend(job)
    assert spend.settled_pico == 77 + 3 * WORST and spend.reserved_pico == 0
    assert len(store.claim(live, 100).requests) == 9
    # the dead runner can write nothing more, and learns it
    with pytest.raises(RunnerLostError):
        store.record(dead, Outcomes(results=[_result(pending[1].id, 1)]))
    assert not store.heartbeat(dead, 30, 0).alive


def test_a_runner_whose_process_is_gone_on_this_host_is_dead_at_once(store: Store) -> None:
    job = _job(store)
    gone = store.register_runner(job, "here", 4242, "sync", ttl=3600)
    store.claim(gone, 2)
    elsewhere = store.register_runner(job, "there", 4242, "sync", ttl=3600)
    assert store.recover(job, "here", lambda pid: pid != 4242) == (2, 2 * WORST)
    assert [r.id for r in store.live_runners(job)] == [elsewhere]  # not judged by our pids


def test_a_runner_whose_heartbeat_expired_shows_as_expired_until_it_is_taken_over(
    store: Store,
) -> None:
    job = _job(store)
    gone = store.register_runner(job, "far", 1, "sync", ttl=0.05)
    store.claim(gone, 2)
    here = store.register_runner(job, "h", 2, "sync", ttl=3600)
    time.sleep(0.1)  # past the first one's heartbeat
    runners = {r.id: r for r in store.status(job).runners}
    assert (runners[gone].expired, runners[gone].holding) == (True, 2)
    assert runners[here].expired is False
    store.recover(job, "h", lambda pid: True)
    assert [r.id for r in store.status(job).runners] == [here]


class _RolledBack(Exception):
    pass


def _lose_the_next_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch, written: bool
) -> list[bool]:
    """The next write transaction loses its connection in its COMMIT, after the COMMIT was
    ``written`` or before it reached the server; the list says when that happened."""
    real, lost = store.dialect.writing, []

    @contextlib.contextmanager
    def commit_lost_once(engine: Any) -> Iterator[Any]:
        if lost:
            with real(engine) as conn:
                yield conn
            return
        lost.append(True)
        try:
            with real(engine) as conn:
                yield conn
                if not written:
                    raise _RolledBack  # the COMMIT never reached the server
        except _RolledBack:
            pass
        raise sa.exc.OperationalError(
            "COMMIT", {}, Exception("server closed the connection unexpectedly"),
            connection_invalidated=True,
        )  # fmt: skip

    monkeypatch.setattr(store.dialect, "writing", commit_lost_once)
    return lost


@pytest.mark.parametrize("written", [True, False], ids=["written", "not-written"])
def test_a_group_commit_whose_commit_lost_the_connection_is_recorded_exactly_once(
    store: Store, monkeypatch: pytest.MonkeyPatch, written: bool
) -> None:
    """The server went away while the COMMIT was on its way: the store looks whether the
    group was written and writes it only if it was not. The books count each result once."""
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    first, second = store.claim(runner, 2).requests
    lost = _lose_the_next_commit(store, monkeypatch, written)
    out = Outcomes(
        results=[_result(first.id, 40)],
        releases=[ReleaseRecord(second.id, 1, "again later", WORST)],
    )
    spend = store.record(runner, out)
    assert lost == [True]
    assert spend.settled_pico == 40 and spend.reserved_pico == 0
    assert store.status(job).states == {"done": 1, "pending": 9}
    with store.engine.connect() as conn:
        counts = conn.execute(
            sa.text("SELECT (SELECT COUNT(*) FROM ledger), (SELECT COUNT(*) FROM results)")
        ).one()
    assert tuple(counts) == (1, 1)


@pytest.mark.parametrize("written", [True, False], ids=["written", "not-written"])
def test_a_claim_whose_commit_lost_the_connection_hands_out_its_requests_once(
    store: Store, monkeypatch: pytest.MonkeyPatch, written: bool
) -> None:
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    lost = _lose_the_next_commit(store, monkeypatch, written)
    claim = store.claim(runner, 3)
    assert lost == [True]
    assert [r.seq for r in claim.requests] == [0, 1, 2]  # the same three, either way
    assert claim.spend.reserved_pico == 3 * WORST
    assert store.status(job).states == {"reserved": 3, "pending": 7}
    assert [r.seq for r in store.claim(runner, 2).requests] == [3, 4]


def test_a_connection_lost_before_the_commit_is_retried_on_a_new_one(
    pg_url: str,
) -> None:
    """PostgreSQL: the server kills the runner's connection while its group commit waits for
    a lock (an administrator, a failover); the store reconnects and writes the group."""
    import threading

    import psycopg

    store = open_store(pg_url)
    try:
        job = _job(store, sha="k")
        runner = store.register_runner(job, "h", 1, "sync", 30)
        (req,) = store.claim(runner, 1).requests
        with psycopg.connect(pg_url) as admin:
            admin.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job,))  # books wait
            done: list[Any] = []
            writer = threading.Thread(
                target=lambda: done.append(
                    store.record(runner, Outcomes(results=[_result(req.id, 40)]))
                )
            )
            writer.start()
            deadline = time.monotonic() + 10
            while True:  # the writer's backend, waiting for the job's row
                (pids,) = admin.execute(
                    "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event_type = 'Lock'"
                ).fetchone()
                if pids:
                    break
                assert time.monotonic() < deadline, "the writer never waited for the lock"
                time.sleep(0.01)
            admin.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) p", (pids,))
            admin.rollback()  # the lock goes; the writer's new connection gets it
        writer.join(20)
        assert not writer.is_alive() and done, "the group commit was not retried"
        assert done[0].settled_pico == 40
        assert store.status(job).states == {"done": 1, "pending": 9}
    finally:
        store.close()


def test_fits_under_counts_pending_requests_in_file_order(store: Store) -> None:
    job = _job(store)
    assert store.fits_under(job, 0) == 0
    assert store.fits_under(job, 199) == 0
    assert store.fits_under(job, 200) == 1
    assert store.fits_under(job, 1000) == 5
    assert store.fits_under(job, 1000, batch=True) == 10
    assert store.fits_under(job, 10**9) == 10


def test_status_counts_reused_results_apart_from_spend(store: Store) -> None:
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    a, b = store.claim(runner, 2).requests
    store.record(
        runner,
        Outcomes(
            results=[
                _result(a.id, 40),
                _result(b.id, 0, flags=(ResultFlag.USAGE_MISSING,), cost_pico=WORST),
            ]
        ),
    )
    s = store.status(job)
    assert s.by_model["gpt-4o-mini"]["cost_pico"] == 40 + WORST
    assert s.usage_missing == 1 and s.reused == 0


def test_writing_into_a_deleted_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    store = open_store(db)
    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreError, match="deleted or replaced"):
        store.claim(runner, 1)
    store.close()


def test_a_database_of_schema_0001_is_upgraded_with_its_books(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_SCHEMA_0001)
    store = open_store(db)
    spend, cap = store.books(1)
    assert (spend.settled_pico, spend.reserved_pico, cap) == (500, 200, 10**12)
    assert store.recover(1, "h", lambda pid: True) == (1, 200)  # the old run's reservation
    store.close()


_SCHEMA_0001 = """
CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY);
INSERT INTO alembic_version VALUES ('0001');
CREATE TABLE jobs (id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 VARCHAR(64) NOT NULL UNIQUE,
  created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, cap_pico BIGINT DEFAULT '0' NOT NULL,
  state VARCHAR(16) DEFAULT 'new' NOT NULL, requests INTEGER NOT NULL,
  input_tokens BIGINT NOT NULL, output_limit_tokens BIGINT NOT NULL, floor_pico BIGINT NOT NULL,
  worst_pico BIGINT NOT NULL, lease_owner VARCHAR(64), lease_expires FLOAT);
CREATE TABLE requests (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs (id),
  seq INTEGER NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, url VARCHAR(64) NOT NULL,
  model TEXT NOT NULL, body TEXT NOT NULL, input_tokens INTEGER NOT NULL,
  output_limit INTEGER NOT NULL, worst_pico BIGINT NOT NULL, floor_pico BIGINT NOT NULL,
  approximate BOOLEAN DEFAULT 0 NOT NULL, state VARCHAR(12) DEFAULT 'pending' NOT NULL,
  attempts INTEGER DEFAULT '0' NOT NULL, reserved_pico BIGINT DEFAULT '0' NOT NULL,
  last_error TEXT, CONSTRAINT uq_requests_job_seq UNIQUE (job_id, seq),
  CONSTRAINT uq_requests_job_custom_id UNIQUE (job_id, custom_id));
CREATE INDEX ix_requests_job_state_seq ON requests (job_id, state, seq);
CREATE TABLE attempts (id INTEGER PRIMARY KEY, request_id INTEGER NOT NULL REFERENCES requests(id),
  attempt INTEGER NOT NULL, started_at FLOAT NOT NULL, latency_ms INTEGER NOT NULL,
  status_code INTEGER, error_kind VARCHAR(32));
CREATE INDEX ix_attempts_request ON attempts (request_id);
CREATE TABLE results (request_id INTEGER NOT NULL PRIMARY KEY REFERENCES requests (id),
  status_code INTEGER, body TEXT, response_model TEXT, api_request_id TEXT,
  prompt_tokens INTEGER DEFAULT '0' NOT NULL, cached_tokens INTEGER DEFAULT '0' NOT NULL,
  completion_tokens INTEGER DEFAULT '0' NOT NULL, reasoning_tokens INTEGER DEFAULT '0' NOT NULL,
  cost_pico BIGINT DEFAULT '0' NOT NULL, latency_ms INTEGER DEFAULT '0' NOT NULL,
  finished_at FLOAT NOT NULL, error_code TEXT, error_message TEXT);
CREATE TABLE ledger (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs (id),
  request_id INTEGER REFERENCES requests (id), kind VARCHAR(16) NOT NULL,
  amount_pico BIGINT NOT NULL, at FLOAT NOT NULL);
CREATE INDEX ix_ledger_job ON ledger (job_id);
INSERT INTO jobs VALUES (1, '/x.jsonl', 'x', 0, 0, 1000000000000, 'stopped', 2, 20, 10, 200,
  400, 'host:1:ab', 0);
INSERT INTO requests VALUES (1, 1, 0, 1, 'a', '/v1/chat/completions', 'gpt-4o-mini', '{}', 10, 5,
  200, 100, 0, 'done', 1, 0, NULL);
INSERT INTO requests VALUES (2, 1, 1, 2, 'b', '/v1/chat/completions', 'gpt-4o-mini', '{}', 10, 5,
  200, 100, 0, 'reserved', 0, 200, NULL);
INSERT INTO ledger VALUES (1, 1, 1, 'result', 500, 0);
"""


def test_the_schema_head_the_store_knows_is_the_newest_migration() -> None:
    from runner.store.migrate import SCHEMA_HEAD, migration_head

    assert migration_head() == SCHEMA_HEAD


def test_imported_rows_come_back_exactly_whatever_they_hold(store: Store) -> None:
    """The bulk import (COPY, raw executemany) stores every value as it was given."""
    odd = ["tab\there", "new\nline", "back\\slash \\N", "ünïcødé 中文 🙂", 'quote\'s "q"', ""]
    rows = [
        NewRequest(i, i + 1, f"id-{i}-{text}", "/v1/chat/completions", "gpt-4o-mini",
                   json.dumps({"s": text}), 2**31 - 1,
                   0, 2**40 + i, i, i % 2 == 0, unbounded=i % 3 == 0, batch_worst_pico=7)
        for i, text in enumerate(odd)
    ]  # fmt: skip
    job = store.create_job("/x.jsonl", "a" * 64, 2**50, rows, _Totals(len(rows))).id
    runner = store.register_runner(job, "h", 1, "sync", 30)
    got = store.claim(runner, 100).requests
    assert [(r.seq, r.line, r.custom_id, r.body, r.input_tokens, r.worst_pico, r.unbounded)
            for r in got] == [
        (r.seq, r.line, r.custom_id, r.body, r.input_tokens, r.worst_pico, r.unbounded)
        for r in rows
    ]  # fmt: skip


def test_a_pause_one_runner_shares_reaches_the_others_heartbeats(store: Store) -> None:
    job = _job(store)
    a = store.register_runner(job, "h", 1, "sync", 30)
    b = store.register_runner(job, "h", 2, "sync", 30)
    assert store.heartbeat(b, 30, 0).paused_until == 0
    until = time.time() + 5
    store.share_pause(job, until)
    store.share_pause(job, until - 2)  # an earlier end never shortens a pause
    assert store.heartbeat(b, 30, 0).paused_until == pytest.approx(until, abs=0.5)
    assert store.heartbeat(a, 30, 0).live_runners == 2


def test_runners_share_the_rate_limits_equally_then_by_what_they_hold(store: Store) -> None:
    job = _job(store, n=10)
    a = store.register_runner(job, "h", 1, "sync", 30)
    b = store.register_runner(job, "h", 2, "sync", 30)
    c = store.register_runner(job, "h", 3, "sync", 30)
    store.claim(a, 6)
    store.claim(b, 2)
    # Requests wait to be claimed: every live runner has an equal share.
    assert store.heartbeat(a, 30, 4).share == pytest.approx(1 / 3)
    store.claim(c, 10)  # the last two: nothing waits any more
    beats = {r: store.heartbeat(r, 30, 0) for r in (a, b, c)}
    assert [beats[r].share for r in (a, b, c)] == pytest.approx([0.6, 0.2, 0.2])
    assert beats[c].others_sending == 2
    store.record(c, Outcomes(results=[_result(r.id, 1) for r in store.claim(c, 0).requests]))
    live = {r.id: r for r in store.live_runners(job)}
    assert (live[a].holding, live[a].in_flight, live[a].share) == (6, 0, pytest.approx(0.6))
    assert live[a].host == "h" and live[a].pid == 1 and live[a].seen_ago < 5


def test_a_status_reads_one_snapshot_while_a_runner_commits(
    store: Store, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result committed between two of status's queries shows in none of them: the counts
    by state, by model and the books agree (PostgreSQL's READ COMMITTED would mix them)."""
    from runner.store import reads

    job = _job(store)
    runner = store.register_runner(job, "h", 1, "sync", 30)
    first, second = store.claim(runner, 2).requests
    store.record(runner, Outcomes(results=[_result(first.id, 40)]))
    sqlite = request.node.callspec.params["store"] == "sqlite"
    other = open_store(tmp_path / "b.db" if sqlite else request.getfixturevalue("pg_url"))
    real, committed = reads._done_sums, []

    def commit_then_sum(conn, job_id, column):  # type: ignore[no-untyped-def]
        if not committed:  # another runner commits after status counted the states
            other.record(runner, Outcomes(results=[_result(second.id, 30)]))
            committed.append(True)
        return real(conn, job_id, column)

    monkeypatch.setattr(reads, "_done_sums", commit_then_sum)
    try:
        status = store.status(job)
    finally:
        other.close()
    assert committed
    assert status.states["done"] == 1
    assert sum(g["requests"] for g in status.by_model.values()) == 1
    assert status.spend.settled_pico == 40 and status.spend.reserved_pico == WORST
    assert store.status(job).states["done"] == 2  # the next status sees it
