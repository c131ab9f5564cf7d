"""Checks of a job's books against the simulator's bill, shared by the crash and fault tests.

The simulator's ``Ledger`` is the independent record of what was billed. ``watch_bills`` swaps
in a subclass that also remembers what each request body (sha256 of the bytes sent) was billed,
so the books can be checked request by request, not just in total: a surplus on one request
must not hide a shortfall on another.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.simulator import Ledger, SimulatorThread


class BillsByBody(Ledger):
    """The simulator's ledger, plus the times billed and the picodollars billed per body."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[bytes, int] = {}
        self.pico: dict[bytes, int] = {}

    def bill(self, model: str, digest: bytes, usage: tuple[int, int, int], pico: int) -> None:
        super().bill(model, digest, usage, pico)
        self.times[digest] = self.times.get(digest, 0) + 1
        self.pico[digest] = self.pico.get(digest, 0) + pico


def watch_bills(sim: SimulatorThread) -> BillsByBody:
    """Install a per-body ledger on a simulator that has not billed anything yet."""
    bills = BillsByBody()

    def install() -> None:
        assert sim.simulator.ledger.requests_received == 0, "install before the first request"
        sim.simulator.ledger = bills

    sim.call(install)
    return bills


def body_digest(body: str) -> bytes:
    """The digest the simulator bills a stored request body under (batchrun sends its bytes)."""
    return hashlib.sha256(body.encode()).digest()


def wait_quiet(sim: SimulatorThread, timeout: float = 10.0) -> None:
    """Wait until the server has answered everything it received: a killed client's requests
    are still processed (and billed) by the server after the connection is gone."""
    deadline = time.monotonic() + timeout
    stable = 0
    while time.monotonic() < deadline:
        snap = sim.ledger_snapshot()
        busy = snap["requests_received"] - sum(snap["status_counts"].values())
        stable = stable + 1 if busy == 0 else 0
        if stable >= 3:
            return
        time.sleep(0.02)
    raise AssertionError(f"the simulator is still busy after {timeout}s")


def rows(db: Path | str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Query a run's database: an SQLite file, or a PostgreSQL URL (``?`` placeholders)."""
    if str(db).startswith("postgresql"):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            return pg.execute(sql.replace("?", "%s"), params).fetchall()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def scalar(db: Path | str, sql: str, *params: object) -> int:
    return int(rows(db, sql, *params)[0][0] or 0)


@dataclass(frozen=True, slots=True)
class Books:
    ledger_pico: int  # settled spend: results + unknown-outcome charges
    reserved_pico: int  # open reservations (requests a dead run may have sent)
    done: int
    failed: int
    pending: int
    reserved: int

    @property
    def recorded_pico(self) -> int:
        """What the job counts as spent: settled plus what recovery will charge."""
        return self.ledger_pico + self.reserved_pico


def books(db: Path | str) -> Books:
    states = dict(rows(db, "SELECT state, COUNT(*) FROM requests GROUP BY state"))
    return Books(
        ledger_pico=scalar(db, "SELECT COALESCE(SUM(amount_pico), 0) FROM ledger"),
        reserved_pico=scalar(db, "SELECT COALESCE(SUM(reserved_pico), 0) FROM requests"),
        done=int(states.get("done", 0)),
        failed=int(states.get("failed", 0)),
        pending=int(states.get("pending", 0)),
        reserved=int(states.get("reserved", 0)),
    )


def assert_consistent(db: Path | str) -> None:
    """The database is whole whatever moment the run was stopped at: no half-written result,
    no reservation without its amount, one result at most per request, intact pages."""
    if not str(db).startswith("postgresql"):  # the server checks its pages and foreign keys
        assert rows(db, "PRAGMA integrity_check") == [("ok",)]
        assert rows(db, "PRAGMA foreign_key_check") == []
    # A request has a result exactly when it is finished.
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM requests r LEFT JOIN results s ON s.request_id = r.id "
            "WHERE (s.request_id IS NULL) = (r.state IN ('done', 'failed'))",
        )
        == 0
    )
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM requests WHERE state NOT IN "
            "('pending', 'reserved', 'done', 'failed')",
        )
        == 0
    )
    # A result's cost is in the ledger once, in the same commit as the result.
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM results s WHERE s.cost_pico > 0 AND 1 != (SELECT COUNT(*) "
            "FROM ledger l WHERE l.request_id = s.request_id AND l.kind = 'result' "
            "AND l.amount_pico = s.cost_pico)",
        )
        == 0
    )
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM ledger l LEFT JOIN results s ON s.request_id = l.request_id "
            "WHERE l.kind = 'result' AND s.request_id IS NULL",
        )
        == 0
    )
    # A reservation holds exactly the request's worst case; nothing else holds money.
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM requests WHERE (state = 'reserved' AND reserved_pico NOT IN "
            "(worst_pico, batch_worst_pico)) OR (state != 'reserved' AND reserved_pico != 0)",
        )
        == 0
    )
    # A reservation is held by a runner, or (Batch API) by an open batch of the same job; a
    # batch that ended holds nothing.
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM requests r WHERE r.state = 'reserved' AND r.runner_id IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = r.chunk_id AND b.job_id = "
            "r.job_id AND b.state IN ('prepared', 'submitted'))",
        )
        == 0
    )
    # The books on each job's row are the sums they stand for.
    assert (
        rows(
            db,
            "SELECT j.id FROM jobs j WHERE j.settled_pico != (SELECT COALESCE(SUM(amount_pico), 0) "
            "FROM ledger l WHERE l.job_id = j.id) OR j.reserved_pico != (SELECT "
            "COALESCE(SUM(reserved_pico), 0) FROM requests r WHERE r.job_id = j.id)",
        )
        == []
    )
    # Money only in the ledger's known kinds, never negative.
    assert (
        scalar(
            db,
            "SELECT COUNT(*) FROM ledger WHERE kind NOT IN ('result', 'unknown') "
            "OR amount_pico < 0",
        )
        == 0
    )


def assert_covers_bill(
    db: Path | str, sim: SimulatorThread, bills: BillsByBody | None = None
) -> None:
    """Recorded spend (settled + open reservations) is never below what the server billed:
    in total, and (with ``bills``) for every single request."""
    billed = sim.ledger_snapshot()["billed_pico"]
    b = books(db)
    assert b.recorded_pico >= billed, (
        f"recorded ${b.recorded_pico / 1e12:.6f} < billed ${billed / 1e12:.6f}: {b}"
    )
    if bills is None:
        return
    recorded = dict(
        rows(
            db,
            "SELECT r.body, r.reserved_pico + COALESCE((SELECT SUM(l.amount_pico) FROM ledger l "
            "WHERE l.request_id = r.id), 0) FROM requests r",
        )
    )
    short = []
    for body, pico in recorded.items():
        got = bills.pico.get(body_digest(str(body)), 0)
        if int(pico) < got:
            short.append((got, pico))
    assert not short, (
        f"{len(short)} request(s) recorded below their bill (billed, recorded): {short[:5]}"
    )
