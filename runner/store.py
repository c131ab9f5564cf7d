"""The database: jobs, their requests, every attempt, every result and the spend ledger.

SQLite through SQLAlchemy Core, schema owned by Alembic (``migrations/``). Nothing above this
module knows it is SQLite: the pragmas and file permissions live here, so a PostgreSQL store can
take its place. Every method is synchronous and short; the engine runs them on one dedicated
thread so the event loop never blocks on disk.

Money invariants kept here:
- a request is ``reserved`` (its worst-case cost held in ``reserved_pico``) *before* it is sent;
- a finished request's actual cost is a ``result`` row in the ledger, written in the same
  transaction as its result, which also drops its reservation;
- a request whose fate is unknown (sent, then a timeout or a crash) is charged its worst case as
  an ``unknown`` ledger row, so recorded spend is never below what the API billed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from .errors import LeaseHeldError, StoreError

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("cap_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(16), nullable=False, server_default="new"),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_limit_tokens", sa.BigInteger, nullable=False),
    sa.Column("floor_pico", sa.BigInteger, nullable=False),
    sa.Column("worst_pico", sa.BigInteger, nullable=False),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_expires", sa.Float),
)

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("custom_id", sa.Text, nullable=False),
    sa.Column("url", sa.String(64), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_limit", sa.Integer, nullable=False),
    sa.Column("worst_pico", sa.BigInteger, nullable=False),
    sa.Column("floor_pico", sa.BigInteger, nullable=False),
    sa.Column("approximate", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("state", sa.String(12), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.UniqueConstraint("job_id", "seq", name="uq_requests_job_seq"),
    sa.UniqueConstraint("job_id", "custom_id", name="uq_requests_job_custom_id"),
    sa.Index("ix_requests_job_state_seq", "job_id", "state", "seq"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error_kind", sa.String(32)),
    sa.Index("ix_attempts_request", "request_id"),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id"), primary_key=True),
    sa.Column("status_code", sa.Integer),
    sa.Column("body", sa.Text),
    sa.Column("response_model", sa.Text),
    sa.Column("api_request_id", sa.Text),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Integer, nullable=False, server_default="0"),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
)

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id")),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount_pico", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("ix_ledger_job", "job_id"),
)

MIGRATIONS_PACKAGE = "runner.migrations"
INSERT_CHUNK = 2000


# -- rows handed to and from the engine ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    path: str
    sha256: str
    cap_pico: int
    state: str
    requests: int
    input_tokens: int
    output_limit_tokens: int
    floor_pico: int
    worst_pico: int
    created_at: float


@dataclass(slots=True)
class NewRequest:
    """One planned request, as imported from the job file."""

    seq: int
    line: int
    custom_id: str
    url: str
    model: str
    body: str
    input_tokens: int
    output_limit: int
    worst_pico: int
    floor_pico: int
    approximate: bool


@dataclass(slots=True)
class PendingRequest:
    """What the engine needs to send one request."""

    id: int
    seq: int
    custom_id: str
    url: str
    model: str
    body: str
    input_tokens: int
    output_limit: int
    worst_pico: int
    attempts: int


@dataclass(slots=True)
class AttemptRecord:
    request_id: int
    attempt: int
    started_at: float
    latency_ms: int
    status_code: int | None
    error_kind: str | None


@dataclass(slots=True)
class ResultRecord:
    """A request's final outcome: its result row, its ledger charge, its new state."""

    request_id: int
    state: str  # "done" or "failed"
    attempts: int
    status_code: int | None
    body: str | None
    response_model: str | None
    api_request_id: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_pico: int
    latency_ms: int
    finished_at: float
    error_code: str | None = None
    error_message: str | None = None


@dataclass(slots=True)
class ChargeRecord:
    """An ``unknown`` charge: the request may have been billed and we cannot know for how much."""

    request_id: int
    amount_pico: int
    at: float


@dataclass(slots=True)
class ReleaseRecord:
    """Give a reservation back: the request was never sent, or will be retried later."""

    request_id: int
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Spend:
    settled_pico: int  # ledger total: actual costs plus unknown-outcome charges
    reserved_pico: int  # open reservations of requests being sent

    @property
    def total_pico(self) -> int:
        return self.settled_pico + self.reserved_pico


@dataclass(slots=True)
class JobStatus:
    """Everything ``batchrun status`` shows about one job."""

    job: Job
    states: dict[str, int]
    spend: Spend
    unknown_pico: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    done_output_limit: int  # sum of output limits of the finished requests
    errors: dict[str, int]  # error kind or code -> count (final failures and retried attempts)
    pending_worst_pico: int
    pending_floor_pico: int


@dataclass(slots=True)
class ExportRow:
    seq: int
    custom_id: str
    state: str
    last_error: str | None
    status_code: int | None
    body: str | None
    api_request_id: str | None
    error_code: str | None
    error_message: str | None
    has_result: bool



# -- opening ------------------------------------------------------------------------------------


def _sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def _create_private(path: Path) -> None:
    """Create an empty database file readable by its owner only (SQLite's -wal/-shm inherit it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy own transactions (pysqlite's implicit BEGIN is off), then BEGIN IMMEDIATE
    # takes the write lock up front so two writers queue on busy_timeout instead of deadlocking.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA busy_timeout = 5000")
    cur.execute("PRAGMA journal_mode = WAL")
    # FULL: a committed result survives a power cut, not just a killed process. Commits are
    # batched, so the fsync is paid a few times a second, not once per result.
    cur.execute("PRAGMA synchronous = FULL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


_WRITES = "batchrun_writes"  # execution option of connections whose transactions write


def _on_begin(conn: Connection) -> None:
    # A writer takes the write lock up front (BEGIN IMMEDIATE), so two writers queue on
    # busy_timeout instead of deadlocking. A reader begins deferred: in WAL mode it never waits
    # for a writer, so a lock held by another process cannot fail a read.
    writes = conn.get_execution_options().get(_WRITES)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


@contextlib.contextmanager
def _writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction: BEGIN IMMEDIATE, then COMMIT (ROLLBACK on error)."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITES: True})
        with conn.begin():
            yield conn


def _sqlite_errmsg(exc: BaseException, path: Path | None = None) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip() or orig.__class__.__name__
    if "readonly" in text or "read-only" in text:
        return "the database is read-only (check the file's and its folder's permissions)"
    if "unable to open" in text and path is not None:
        # SQLite's own message names no cause; the usual one is a folder it cannot write to.
        folder = path.parent
        if not os.access(folder, os.W_OK):
            return (
                f"cannot open the database: its folder {folder} is read-only, and SQLite must "
                f"create {path.name}-wal and {path.name}-shm beside it; use a writable folder"
            )
        return "cannot open the database file (check the file's and its folder's permissions)"
    if "disk I/O error" in text:
        return (
            "writing the database failed (disk I/O error): the disk may be full or failing, or "
            "the file may have reached a size limit; fix that and run the same command again to "
            "resume"
        )
    if "locked" in text or "busy" in text:
        return "the database is locked by another process; try again when it has finished"
    if "disk is full" in text or "full" in text:
        return "the disk is full; free space and run the same command again to resume"
    if "not a database" in text or "malformed" in text:
        return "the file is not a batchrun database (or it is damaged)"
    return text


class Store:
    """One open database. Use :meth:`open`."""

    def __init__(self, engine: Engine, path: Path | None) -> None:
        self.engine = engine
        self.path = path
        self._lease: tuple[int, str] | None = None  # (job id, owner) while this process holds it

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open (creating if needed) and migrate a database file; refuse a newer schema."""
        path = Path(path)
        if path.is_dir():
            raise StoreError(f"{path}: is a directory, not a database file")
        try:
            _create_private(path)
        except OSError as exc:
            raise StoreError(f"{path}: cannot create database: {exc.strerror}") from None
        engine = sa.create_engine(
            _sqlite_url(path),
            connect_args={"check_same_thread": False, "timeout": 5.0},
        )
        sa.event.listen(engine, "connect", _on_connect)
        sa.event.listen(engine, "begin", _on_begin)
        store = cls(engine, path)
        try:
            store._migrate()
        except StoreError:
            engine.dispose()
            raise
        except sa.exc.SQLAlchemyError as exc:
            engine.dispose()
            raise StoreError(f"{path}: {_sqlite_errmsg(exc, path)}") from None
        return store

    def _migrate(self) -> None:
        location = str(resources.files(MIGRATIONS_PACKAGE))
        cfg = Config()
        cfg.set_main_option("script_location", location)
        script = ScriptDirectory.from_config(cfg)
        head = script.get_current_head()
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        known = {rev.revision for rev in script.walk_revisions()}
        if current is not None and current not in known:
            raise StoreError(
                f"{self.path}: this database was written by a newer batchrun "
                f"(schema {current}); upgrade batchrun to use it"
            )
        with _writing(self.engine) as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    def _write(self) -> Any:
        """A write transaction whose SQLite errors become clear StoreErrors."""
        return _WriteTxn(self)

    # -- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def _job(row: Any) -> Job:
        return Job(
            id=row.id,
            path=row.path,
            sha256=row.sha256,
            cap_pico=row.cap_pico,
            state=row.state,
            requests=row.requests,
            input_tokens=row.input_tokens,
            output_limit_tokens=row.output_limit_tokens,
            floor_pico=row.floor_pico,
            worst_pico=row.worst_pico,
            created_at=row.created_at,
        )

    def job_by_sha(self, sha256: str) -> Job | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.sha256 == sha256)).first()
        return self._job(row) if row else None

    def job_by_id(self, job_id: int) -> Job:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()
        return self._job(row)

    def jobs_for_path(self, path: str) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.path == path).order_by(jobs.c.id.desc())
            ).all()
        return [self._job(r) for r in rows]

    def all_jobs(self) -> list[Job]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs).order_by(jobs.c.id)).all()
        return [self._job(r) for r in rows]

    def create_job(
        self,
        path: str,
        sha256: str,
        cap_pico: int,
        rows: Iterable[NewRequest],
        totals: Any,
    ) -> Job:
        """Import a whole job in one transaction: all of it, or (on any error) none of it.

        ``rows`` is consumed lazily (the job file is streamed through it); ``totals`` is read
        only after ``rows`` is exhausted, so a planner can fill it in as it goes.
        """
        now = time.time()
        with self._write() as conn:
            job_id = conn.execute(
                jobs.insert().values(
                    path=path,
                    sha256=sha256,
                    created_at=now,
                    updated_at=now,
                    cap_pico=cap_pico,
                    state="new",
                    requests=0,
                    input_tokens=0,
                    output_limit_tokens=0,
                    floor_pico=0,
                    worst_pico=0,
                )
            ).inserted_primary_key[0]
            chunk: list[dict[str, Any]] = []
            insert = requests.insert()
            for r in rows:
                chunk.append(
                    {
                        "job_id": job_id,
                        "seq": r.seq,
                        "line": r.line,
                        "custom_id": r.custom_id,
                        "url": r.url,
                        "model": r.model,
                        "body": r.body,
                        "input_tokens": r.input_tokens,
                        "output_limit": r.output_limit,
                        "worst_pico": r.worst_pico,
                        "floor_pico": r.floor_pico,
                        "approximate": r.approximate,
                    }
                )
                if len(chunk) >= INSERT_CHUNK:
                    conn.execute(insert, chunk)
                    chunk.clear()
            if chunk:
                conn.execute(insert, chunk)
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    requests=totals.requests,
                    input_tokens=totals.input_tokens,
                    output_limit_tokens=totals.output_limit_tokens,
                    floor_pico=totals.floor_pico,
                    worst_pico=totals.worst_pico,
                )
            )
        return self.job_by_id(job_id)

    def set_job(self, job_id: int, **values: Any) -> None:
        """Update a job's cap, state or path."""
        values["updated_at"] = time.time()
        with self._write() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))

    def request_fingerprints(self, job_id: int) -> Iterator[tuple[str, str]]:
        """(custom_id, body) of every request, in file order, streamed."""
        with self.engine.connect() as conn:
            result = conn.execution_options(yield_per=5000).execute(
                sa.select(requests.c.custom_id, requests.c.body)
                .where(requests.c.job_id == job_id)
                .order_by(requests.c.seq)
            )
            for row in result:
                yield row.custom_id, row.body

    # -- leases ---------------------------------------------------------------------------------

    def acquire_lease(self, job_id: int, owner: str, ttl_s: float) -> None:
        """Claim the job for this process, or raise LeaseHeldError if a live one holds it."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                sa.select(jobs.c.lease_owner, jobs.c.lease_expires).where(jobs.c.id == job_id)
            ).one()
            if row.lease_owner and row.lease_owner != owner and (row.lease_expires or 0) > now:
                raise LeaseHeldError(
                    f"job {job_id} is being run by another batchrun process ({row.lease_owner}); "
                    f"its lease expires in {row.lease_expires - now:.0f}s unless renewed. "
                    "Wait for it to finish, or stop it first."
                )
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(lease_owner=owner, lease_expires=now + ttl_s)
            )
        self._lease = (job_id, owner)

    def _check_lease(self, conn: Connection) -> None:
        """Refuse the run's writes once another runner has taken the job over (this process was
        suspended past its lease's expiry): both would send, and book, the same requests."""
        if self._lease is None:
            return
        job_id, owner = self._lease
        holder = conn.execute(sa.select(jobs.c.lease_owner).where(jobs.c.id == job_id)).scalar()
        if holder != owner:
            raise LeaseHeldError(
                f"job {job_id} was taken over by another batchrun process ({holder}) after this "
                "one stopped renewing its lease (was it suspended?); this run stops here, and "
                "what it had in flight is charged at worst case by the other one"
            )

    def renew_lease(self, job_id: int, owner: str, ttl_s: float) -> bool:
        with self._write() as conn:
            n = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
                .values(lease_expires=time.time() + ttl_s)
            ).rowcount
        return n == 1

    def release_lease(self, job_id: int, owner: str) -> None:
        self._lease = None
        with self._write() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires=None)
            )

    # -- spend ----------------------------------------------------------------------------------

    def recover_orphans(self, job_id: int) -> tuple[int, int]:
        """Charge requests left reserved by a process that died, and queue them again.

        Their fate is unknown (sent or not, billed or not), so each is charged its worst case:
        the books may over-report after a crash, never under-report. Returns (count, pico).
        """
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                sa.select(requests.c.id, requests.c.reserved_pico).where(
                    requests.c.job_id == job_id, requests.c.state == "reserved"
                )
            ).all()
            if not rows:
                return 0, 0
            conn.execute(
                ledger.insert(),
                [
                    {
                        "job_id": job_id,
                        "request_id": r.id,
                        "kind": "unknown",
                        "amount_pico": r.reserved_pico,
                        "at": now,
                    }
                    for r in rows
                ],
            )
            conn.execute(
                requests.update()
                .where(requests.c.job_id == job_id, requests.c.state == "reserved")
                .values(state="pending", reserved_pico=0)
            )
        return len(rows), sum(r.reserved_pico for r in rows)

    def spend(self, job_id: int) -> Spend:
        with self.engine.connect() as conn:
            settled = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount_pico), 0)).where(
                    ledger.c.job_id == job_id
                )
            ).scalar_one()
            reserved = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(requests.c.reserved_pico), 0)).where(
                    requests.c.job_id == job_id, requests.c.state == "reserved"
                )
            ).scalar_one()
        return Spend(int(settled), int(reserved))

    def state_counts(self, job_id: int) -> dict[str, int]:
        """Requests by state: one pass over the (job_id, state, seq) index."""
        with self.engine.connect() as conn:
            return {
                state: int(n)
                for state, n in conn.execute(
                    sa.select(requests.c.state, sa.func.count())
                    .where(requests.c.job_id == job_id)
                    .group_by(requests.c.state)
                )
            }

    def pending_worst(self, job_id: int) -> int:
        """The worst case of every request not yet sent."""
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0)).where(
                        requests.c.job_id == job_id, requests.c.state == "pending"
                    )
                ).scalar_one()
            )

    # -- the run loop ---------------------------------------------------------------------------

    def next_pending(self, job_id: int, after_seq: int, limit: int) -> list[PendingRequest]:
        """The next pending requests in file order, after ``after_seq``."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    requests.c.id,
                    requests.c.seq,
                    requests.c.custom_id,
                    requests.c.url,
                    requests.c.model,
                    requests.c.body,
                    requests.c.input_tokens,
                    requests.c.output_limit,
                    requests.c.worst_pico,
                    requests.c.attempts,
                )
                .where(
                    requests.c.job_id == job_id,
                    requests.c.state == "pending",
                    requests.c.seq > after_seq,
                )
                .order_by(requests.c.seq)
                .limit(limit)
            ).all()
        return [PendingRequest(*r) for r in rows]

    def reserve(self, items: list[PendingRequest]) -> None:
        """Durably hold each request's worst case before it may be sent."""
        if not items:
            return
        with self._write() as conn:
            self._check_lease(conn)
            conn.execute(
                requests.update()
                .where(requests.c.id == sa.bindparam("rid"), requests.c.state == "pending")
                .values(state="reserved", reserved_pico=sa.bindparam("amount")),
                [{"rid": r.id, "amount": r.worst_pico} for r in items],
            )

    def record(
        self,
        job_id: int,
        attempt_rows: list[AttemptRecord],
        charges: list[ChargeRecord],
        results_: list[ResultRecord],
        releases: list[ReleaseRecord],
    ) -> None:
        """Write one batch of outcomes in a single transaction (the engine's group commit)."""
        with self._write() as conn:
            self._check_lease(conn)
            if attempt_rows:
                conn.execute(
                    attempts.insert(),
                    [
                        {
                            "request_id": a.request_id,
                            "attempt": a.attempt,
                            "started_at": a.started_at,
                            "latency_ms": a.latency_ms,
                            "status_code": a.status_code,
                            "error_kind": a.error_kind,
                        }
                        for a in attempt_rows
                    ],
                )
            if charges:
                conn.execute(
                    ledger.insert(),
                    [
                        {
                            "job_id": job_id,
                            "request_id": c.request_id,
                            "kind": "unknown",
                            "amount_pico": c.amount_pico,
                            "at": c.at,
                        }
                        for c in charges
                    ],
                )
            if results_:
                conn.execute(
                    results.insert(),
                    [
                        {
                            "request_id": r.request_id,
                            "status_code": r.status_code,
                            "body": r.body,
                            "response_model": r.response_model,
                            "api_request_id": r.api_request_id,
                            "prompt_tokens": r.prompt_tokens,
                            "cached_tokens": r.cached_tokens,
                            "completion_tokens": r.completion_tokens,
                            "reasoning_tokens": r.reasoning_tokens,
                            "cost_pico": r.cost_pico,
                            "latency_ms": r.latency_ms,
                            "finished_at": r.finished_at,
                            "error_code": r.error_code,
                            "error_message": r.error_message,
                        }
                        for r in results_
                    ],
                )
                billed = [r for r in results_ if r.cost_pico]
                if billed:
                    conn.execute(
                        ledger.insert(),
                        [
                            {
                                "job_id": job_id,
                                "request_id": r.request_id,
                                "kind": "result",
                                "amount_pico": r.cost_pico,
                                "at": r.finished_at,
                            }
                            for r in billed
                        ],
                    )
                conn.execute(
                    requests.update()
                    .where(requests.c.id == sa.bindparam("rid"))
                    .values(
                        state=sa.bindparam("new_state"),
                        attempts=sa.bindparam("n"),
                        reserved_pico=0,
                        last_error=sa.bindparam("err"),
                    ),
                    [
                        {
                            "rid": r.request_id,
                            "new_state": r.state,
                            "n": r.attempts,
                            "err": r.error_message,
                        }
                        for r in results_
                    ],
                )
            if releases:
                conn.execute(
                    requests.update()
                    .where(requests.c.id == sa.bindparam("rid"), requests.c.state == "reserved")
                    .values(
                        state="pending",
                        reserved_pico=0,
                        attempts=sa.bindparam("n"),
                        last_error=sa.bindparam("err"),
                    ),
                    [{"rid": r.request_id, "n": r.attempts, "err": r.last_error} for r in releases],
                )


    # -- reports ----------------------------------------------------------------------------------

    def status(self, job_id: int) -> JobStatus:
        with self.engine.connect() as conn:
            job = self._job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())
            states = dict(
                conn.execute(
                    sa.select(requests.c.state, sa.func.count())
                    .where(requests.c.job_id == job_id)
                    .group_by(requests.c.state)
                ).all()
            )
            tot = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(results.c.prompt_tokens), 0),
                    sa.func.coalesce(sa.func.sum(results.c.completion_tokens), 0),
                    sa.func.coalesce(sa.func.sum(results.c.cached_tokens), 0),
                    sa.func.coalesce(sa.func.sum(results.c.reasoning_tokens), 0),
                    sa.func.coalesce(sa.func.sum(requests.c.output_limit), 0),
                )
                .select_from(results.join(requests, results.c.request_id == requests.c.id))
                .where(requests.c.job_id == job_id, requests.c.state == "done")
            ).one()
            unknown = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount_pico), 0)).where(
                    ledger.c.job_id == job_id, ledger.c.kind == "unknown"
                )
            ).scalar_one()
            failed_kinds = conn.execute(
                sa.select(sa.func.coalesce(results.c.error_code, "error"), sa.func.count())
                .select_from(results.join(requests, results.c.request_id == requests.c.id))
                .where(requests.c.job_id == job_id, requests.c.state == "failed")
                .group_by(sa.func.coalesce(results.c.error_code, "error"))
            ).all()
            retried = conn.execute(
                sa.select(attempts.c.error_kind, sa.func.count())
                .select_from(attempts.join(requests, attempts.c.request_id == requests.c.id))
                .where(requests.c.job_id == job_id, attempts.c.error_kind.is_not(None))
                .group_by(attempts.c.error_kind)
            ).all()
            pending = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0),
                    sa.func.coalesce(sa.func.sum(requests.c.floor_pico), 0),
                ).where(
                    requests.c.job_id == job_id, requests.c.state.in_(("pending", "reserved"))
                )
            ).one()
        errors: dict[str, int] = {f"failed: {k}": n for k, n in failed_kinds}
        errors.update({f"attempts: {k}": n for k, n in retried})
        return JobStatus(
            job=job,
            states=states,
            spend=self.spend(job_id),
            unknown_pico=int(unknown),
            input_tokens=int(tot[0]),
            output_tokens=int(tot[1]),
            cached_tokens=int(tot[2]),
            reasoning_tokens=int(tot[3]),
            done_output_limit=int(tot[4]),
            errors=errors,
            pending_worst_pico=int(pending[0]),
            pending_floor_pico=int(pending[1]),
        )


    def fits_under(self, job_id: int, budget_pico: int) -> int:
        """How many pending requests, taken in file order, fit in ``budget_pico`` at worst case."""
        if budget_pico <= 0:
            return 0
        cum = (
            sa.select(
                sa.func.sum(requests.c.worst_pico).over(order_by=requests.c.seq).label("cum")
            )
            .where(requests.c.job_id == job_id, requests.c.state == "pending")
            .subquery()
        )
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(cum).where(cum.c.cum <= budget_pico)
                ).scalar_one()
            )


    def iter_export(self, job_id: int) -> Iterator[ExportRow]:
        """Every request with its result (if any), in job-file order, streamed."""
        q = (
            sa.select(
                requests.c.seq,
                requests.c.custom_id,
                requests.c.state,
                requests.c.last_error,
                results.c.status_code,
                results.c.body,
                results.c.api_request_id,
                results.c.error_code,
                results.c.error_message,
                results.c.request_id,
            )
            .select_from(requests.outerjoin(results, results.c.request_id == requests.c.id))
            .where(requests.c.job_id == job_id)
            .order_by(requests.c.seq)
        )
        with self.engine.connect() as conn:
            for r in conn.execution_options(yield_per=2000).execute(q):
                yield ExportRow(
                    seq=r.seq,
                    custom_id=r.custom_id,
                    state=r.state,
                    last_error=r.last_error,
                    status_code=r.status_code,
                    body=r.body,
                    api_request_id=r.api_request_id,
                    error_code=r.error_code,
                    error_message=r.error_message,
                    has_result=r.request_id is not None,
                )


class _WriteTxn:
    """``with store._write() as conn``: BEGIN IMMEDIATE ... COMMIT, errors made readable."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._ctx: Any = None

    def _error(self, exc: BaseException) -> StoreError:
        return StoreError(f"{self.store.path}: {_sqlite_errmsg(exc, self.store.path)}")

    def __enter__(self) -> Connection:
        try:
            self._ctx = _writing(self.store.engine)
            return self._ctx.__enter__()
        except sa.exc.SQLAlchemyError as exc:
            raise self._error(exc) from None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        try:
            self._ctx.__exit__(et, ev, tb)
        except sa.exc.SQLAlchemyError as exc:
            raise self._error(exc) from None
        if isinstance(ev, sa.exc.SQLAlchemyError):
            raise self._error(ev) from None
        return False
