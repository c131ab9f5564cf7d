"""Runners on one job: a second process joins instead of being refused, a killed one's requests
are taken over (at once on the same host), and one declared dead writes nothing more."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from runner.simulator import SimulatorThread

from .books import assert_consistent, assert_covers_bill, books, rows, wait_quiet, watch_bills
from .helpers import batchrun, start_run, wait_received, write_job

SimFactory = Callable[..., SimulatorThread]


def _run(
    job: Path, db: Path, sim: SimulatorThread, *extra: str
) -> subprocess.CompletedProcess[str]:
    return batchrun("run", job, "--db", db, "--cap", "5", "--base-url", sim.base_url, *extra)


def test_a_second_runner_on_a_running_job_joins_it_and_nothing_is_sent_twice(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=30)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 400, seed=2)
    first = start_run(job, db, sim, "--concurrency", "8")
    wait_received(sim, 8, first)
    second = _run(job, db, sim, "--concurrency", "8")
    assert second.returncode == 0, second.stderr
    assert first.wait(timeout=60) == 0, first.communicate()
    wait_quiet(sim)
    assert sim.ledger_snapshot()["duplicate_bodies"] == 0
    assert books(db).done == 400
    assert rows(db, "SELECT COUNT(DISTINCT id) FROM runners") == [(2,)]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


def test_after_kill_9_the_same_command_resumes_at_once(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=100)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, seed=3)
    # A heartbeat that lasts an hour: had the second run waited for it to expire, the test
    # would time out; it resumes at once because the dead runner's process is gone.
    first = start_run(job, db, sim, "--concurrency", "8", "--heartbeat-ttl", "3600")
    wait_received(sim, 8, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    sim.configure(latency_ms=0)
    started = time.monotonic()
    out = _run(job, db, sim, "--heartbeat-ttl", "3600")  # same host, its process gone
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 600  # far below the hour a wait would take
    assert "were in flight when a run died" in out.stdout
    wait_quiet(sim)
    assert books(db).done == 200
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


def test_a_runner_on_another_host_is_taken_over_once_its_heartbeat_expires(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=100)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, seed=4)
    first = start_run(job, db, sim, "--concurrency", "8", "--heartbeat-ttl", "3")
    wait_received(sim, 8, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with sqlite3.connect(db) as conn:  # as if it had run on another machine
        conn.execute("UPDATE runners SET host = 'elsewhere'")
    sim.configure(latency_ms=0)
    started = time.monotonic()
    out = _run(job, db, sim, "--heartbeat-ttl", "3")
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started > 1  # it waited for the silent runner's heartbeat
    wait_quiet(sim)
    assert books(db).done == 200
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


def test_a_runner_declared_dead_stops_at_once_and_writes_nothing_more(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    """A runner suspended past its heartbeat (Ctrl-Z, a sleeping laptop) may find another
    runner has taken its requests over: it must not go on sending and booking them."""
    sim = make_simulator(latency_ms=100)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=14)
    proc = start_run(job, db, sim, "--concurrency", "8")
    wait_received(sim, 16, proc)
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("UPDATE runners SET state = 'dead'")  # what another runner's recovery does
    finished_then = rows(db, "SELECT COUNT(*) FROM results")[0][0]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "took over" in err and "Traceback" not in err
    assert rows(db, "SELECT COUNT(*) FROM results")[0][0] == finished_then
    sim.configure(latency_ms=0)
    again = _run(job, db, sim)  # its claims are recovered at worst case; the job finishes
    assert again.returncode == 0, again.stderr
    wait_quiet(sim)
    assert books(db).done == 300
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
