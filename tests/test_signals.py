"""Ctrl-C and SIGTERM on a real ``batchrun run``: stop sending, give in-flight requests the grace
period, record what finished, say where the job stands and how to resume, exit 130 / 143. A
second Ctrl-C stops at once and the database is still consistent. A terminal that hangs up
stops a run the same way, and output nobody reads any more never changes how a run ends."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runner.simulator import SimulatorThread

from .books import assert_consistent, assert_covers_bill, books, scalar, wait_quiet, watch_bills
from .helpers import BATCHRUN, batchrun_env, start_run, wait_received, write_job

SimFactory = Callable[..., SimulatorThread]


def _start(job: Path, db: Path, sim: SimulatorThread, *extra: str) -> subprocess.Popen[str]:
    return start_run(job, db, sim, "--lease-ttl", "2", *extra)


def _resume(job: Path, db: Path, sim: SimulatorThread) -> subprocess.CompletedProcess[str]:
    sim.configure(latency_ms=0)  # the rest of the job, quickly
    proc = _start(job, db, sim)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_signal_stops_dispatch_lets_in_flight_requests_finish_and_says_how_to_resume(
    tmp_path: Path, make_simulator: SimFactory, sig: signal.Signals, status: int
) -> None:
    sim = make_simulator(latency_ms=300)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=5)
    proc = _start(job, db, sim, "--concurrency", "16", "--grace", "10")
    wait_received(sim, 16, proc)
    signalled = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    # In flight for 300 ms: they finish well inside the grace period, then the run ends.
    assert time.monotonic() - signalled < 5
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert f"stopped by {sig.name}" in err
    assert "Run the same command again to resume" in err
    assert "requests:" in out and "pending" in out  # where the job stands
    wait_quiet(sim)
    ledger = sim.ledger_snapshot()
    b = books(db)
    # Nothing new was sent after the signal; everything that was sent finished and was recorded.
    assert ledger["requests_received"] == ledger["requests_billed"] == b.done
    assert 16 <= b.done < 300 and b.reserved == 0
    assert b.ledger_pico == ledger["billed_pico"]  # no unknown outcome: the books are exact
    assert scalar(db, "SELECT COUNT(*) FROM attempts") == b.done
    assert (
        scalar(db, "SELECT COUNT(*) FROM jobs WHERE state = 'stopped'") == 1
        and scalar(db, "SELECT COUNT(*) FROM runners WHERE state = 'live'") == 0
    )
    assert_consistent(db)
    again = _resume(job, db, sim)
    assert again.returncode == 0, again.stderr
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 300 and ledger["duplicate_bodies"] == 0
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_covers_bill(db, sim, bills)


def test_a_second_ctrl_c_stops_at_once_and_leaves_the_database_consistent(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    # Answers take 9 s: a stop that waited for them would take that long, beyond the bound
    # below with room for a busy machine (and within what wait_quiet waits for the server).
    sim = make_simulator(latency_ms=9_000)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, seed=6)
    proc = _start(job, db, sim, "--concurrency", "8", "--grace", "60")
    wait_received(sim, 8, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # waiting for the in-flight requests, up to --grace
    second = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - second < 6  # at once, not after the 9 s the requests need
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "Run the same command again to resume" in err
    assert_consistent(db)
    b = books(db)
    # The abandoned requests are queued again and charged at worst case: their fate is unknown.
    # (The probe, the first request, may have come back before the rest were sent.)
    assert b.reserved == 0 and b.done <= 1 and b.done + b.pending == 200
    unknown = scalar(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")
    assert unknown == sim.ledger_snapshot()["requests_received"] - b.done >= 8
    wait_quiet(sim)  # the server still bills what it received
    assert_covers_bill(db, sim, bills)
    again = _resume(job, db, sim)
    assert again.returncode == 0, again.stderr
    assert books(db).done == 200
    assert_covers_bill(db, sim, bills)


def test_ctrl_c_while_the_job_is_imported_leaves_no_half_imported_job(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20_000, seed=7, prompt_words=10)
    proc = _start(job, db, sim)
    deadline = time.monotonic() + 20
    while not (tmp_path / "run.db-wal").exists():  # the database is open: the import is next
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "run the same command again to resume" in err
    assert_consistent(db)
    # All of the job or none of it (a job is imported in one transaction), and nothing sent.
    imported = scalar(db, "SELECT COUNT(*) FROM requests")
    assert imported in (0, 20_000)
    assert scalar(db, "SELECT COUNT(*) FROM jobs") == (imported > 0)
    assert sim.ledger_snapshot()["requests_received"] == 0


def test_a_terminal_that_hangs_up_stops_the_run_in_order(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    """The ssh session of a run started without nohup closes: the kernel sends SIGHUP and
    later writes to the terminal fail. The run stops as for SIGTERM (in-flight requests are
    recorded, none is left to be charged at worst case) and exits 129."""
    sim = make_simulator(latency_ms=300)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=6)
    master, slave = pty.openpty()

    def take_the_terminal() -> None:  # the run's controlling terminal, as a login shell's
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
         "--concurrency", "16", "--yes"],
        stdin=slave, stdout=slave, stderr=slave, env=batchrun_env(), start_new_session=True,
        preexec_fn=take_the_terminal,
    )  # fmt: skip
    os.close(slave)
    try:
        deadline = time.monotonic() + 20
        while sim.ledger_snapshot()["requests_received"] < 16:
            assert proc.poll() is None and time.monotonic() < deadline
            if select.select([master], [], [], 0.01)[0]:
                os.read(master, 65536)  # keep the terminal drained
    finally:
        os.close(master)  # the hang-up
    assert proc.wait(timeout=30) == 128 + signal.SIGHUP
    wait_quiet(sim)
    ledger = sim.ledger_snapshot()
    b = books(db)
    assert 16 <= b.done < 300 and b.reserved == 0
    assert ledger["requests_received"] == ledger["requests_billed"] == b.done
    assert b.ledger_pico == ledger["billed_pico"]  # no unknown outcome: the books are exact
    assert scalar(db, "SELECT COUNT(*) FROM runners WHERE state = 'live'") == 0
    assert_consistent(db)


def test_a_closed_output_pipe_neither_stops_the_run_nor_changes_its_exit_status(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """``batchrun run ... | head -1``: the reader goes away after one line."""
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, seed=7)
    proc = subprocess.Popen(
        [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url",
         simulator.base_url],
        env=batchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert books(db).done == 200
    assert_consistent(db)
