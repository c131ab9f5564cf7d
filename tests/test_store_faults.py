"""The database failing under a real ``batchrun``: read-only, locked (at start and mid-run) or on
a full disk. Each gives a clear message, exit 2 and a consistent database that resumes."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.simulator import SimulatorThread
from runner.store.sqlite import BUSY_TIMEOUT_MS

from .books import (
    assert_consistent,
    assert_covers_bill,
    books,
    wait_quiet,
    watch_bills,
)
from .helpers import BATCHRUN, batchrun, batchrun_env, start_run, wait_received, write_job

SimFactory = Callable[..., SimulatorThread]


def _run(
    job: Path, db: Path, sim: SimulatorThread, *extra: str, cap: str = "5"
) -> subprocess.CompletedProcess[str]:
    return batchrun(
        "run", job, "--db", db, "--cap", cap, "--base-url", sim.base_url, "--quiet", *extra
    )


def _in_process(*args: str | Path, status: int | None = None) -> None:
    """Set-up steps run the command in this process: the same code, without a start-up."""
    result = CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test-key"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if status is not None:
        assert result.exit_code == status, result.output


def _import(job: Path, db: Path, sim: SimulatorThread) -> None:
    """Import the job and run the few requests a tiny cap allows."""
    _in_process(
        "run", job, "--db", db, "--cap", "0.00001", "--base-url", sim.base_url, "-q", status=3
    )


def _finish(job: Path, db: Path, sim: SimulatorThread) -> None:
    _in_process("run", job, "--db", db, "--cap", "5", "--base-url", sim.base_url, "-q", status=0)


def _clean_failure(out: subprocess.CompletedProcess[str], status: int, *phrases: str) -> None:
    """Exit ``status`` with a message containing ``phrases``, and no traceback."""
    assert out.returncode == status, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    for phrase in phrases:
        assert phrase in out.stderr, out.stderr


def _dump(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


# -- storage faults -------------------------------------------------------------------------------


def _root_tool(*cmd: str | Path) -> bool:
    if os.geteuid() != 0 or shutil.which(str(cmd[0])) is None:
        return False
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


@contextlib.contextmanager
def _read_only_file(path: Path) -> Iterator[None]:
    """The database file cannot be written: mode 0444 for its owner; root ignores modes, so for
    root the immutable attribute (chattr +i) does it."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if not _root_tool("chattr", "+i", path):
        pytest.skip(
            "root without chattr +i (CAP_LINUX_IMMUTABLE): no way to make a file read-only here"
        )
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@contextlib.contextmanager
def _read_only_folder(folder: Path) -> Iterator[None]:
    """The folder is on a read-only filesystem (a read-only bind mount of itself); for a user
    other than root, mode 0555 has the same effect."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if not _root_tool("mount", "--bind", folder, folder):
        pytest.skip("root without mount (CAP_SYS_ADMIN): no read-only filesystem here")
    try:
        if not _root_tool("mount", "-o", "remount,ro,bind", folder):
            pytest.skip("a bind mount cannot be made read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_read_only_database_file_is_a_clear_error_and_is_left_unchanged(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=4)
    _import(job, db, sim)
    before = db.read_bytes()
    received = sim.ledger_snapshot()["requests_received"]
    with _read_only_file(db):
        out = _run(job, db, sim)
        _clean_failure(out, 2, "the database is read-only")
        # Reading still works.
        assert batchrun("status", "--db", db).returncode == 0
        assert batchrun("export", "--db", db).returncode == 0
    assert db.read_bytes() == before
    assert sim.ledger_snapshot()["requests_received"] == received
    _finish(job, db, sim)  # writable again: the job resumes


def test_a_database_in_a_read_only_folder_is_a_clear_error(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    folder = tmp_path / "ro"
    folder.mkdir()
    job, db = tmp_path / "job.jsonl", folder / "run.db"
    write_job(job, 10, seed=5)
    _import(job, db, sim)
    before = db.read_bytes()
    with _read_only_folder(folder):
        for out in (_run(job, db, sim), batchrun("status", "--db", db)):
            _clean_failure(out, 2, f"its folder {folder} is read-only")
    assert db.read_bytes() == before
    _finish(job, db, sim)


@contextlib.contextmanager
def _locked(db: Path) -> Iterator[None]:
    """Another process's exclusive transaction on the database (held by this test process)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_a_database_locked_by_another_process_is_a_clear_error(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=6)
    _import(job, db, sim)
    before = _dump(db)
    received = sim.ledger_snapshot()["requests_received"]
    with _locked(db):  # held until the run gave up: longer than its busy timeout
        out = _run(job, db, sim)
    _clean_failure(out, 2, "the database is locked by another process")
    assert _dump(db) == before
    assert sim.ledger_snapshot()["requests_received"] == received


def test_a_lock_taken_mid_run_stops_the_run_cleanly_and_the_job_resumes(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=100)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=7)
    proc = start_run(job, db, sim, "--concurrency", "8")
    wait_received(sim, 30, proc)
    with _locked(db):
        # The run's next commit waits its busy timeout, then gives up: hold the lock until it
        # has (a generous deadline, for a busy machine), not for a guessed time.
        try:
            out, err = proc.communicate(timeout=BUSY_TIMEOUT_MS / 1000 + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the run did not give up on the locked database") from None
    _clean_failure(
        subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
        2,
        "the database is locked by another process",
    )
    wait_quiet(sim)
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    assert books(db).done < 300
    sim.configure(latency_ms=0)
    _finish(job, db, sim)
    assert books(db).done == 300
    assert_covers_bill(db, sim, bills)


@contextlib.contextmanager
def _small_disk(folder: Path) -> Iterator[Callable[[int], Callable[[], None] | None]]:
    """A folder on its own 8 MB filesystem (tmpfs, as root). Yields ``fill(free_bytes)``, which
    leaves only ``free_bytes`` free. Where nothing can be mounted, the run gets a file-size
    limit instead (RLIMIT_FSIZE), which SQLite meets as a failing write: ``fill`` then returns
    the ``preexec_fn`` that sets it."""
    folder.mkdir()
    if _root_tool("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", folder):
        try:

            def fill(free: int) -> None:
                st = os.statvfs(folder)
                with open(folder / "filler", "wb") as fh:
                    fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free))

            yield fill
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        return

    def limit(free: int) -> Callable[[], None]:
        size = max(p.stat().st_size for p in folder.iterdir()) + free
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    yield limit


def test_a_full_disk_stops_the_run_with_a_clear_error_and_no_half_written_result(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5)
    bills = watch_bills(sim)
    job = tmp_path / "job.jsonl"
    write_job(job, 1000, seed=8)
    with _small_disk(tmp_path / "disk") as fill:
        db = tmp_path / "disk" / "run.db"
        _import(job, db, sim)
        done_before = books(db).done
        preexec = fill(300 * 1024)
        proc = subprocess.run(
            [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url",
             sim.base_url, "--quiet"],
            env=batchrun_env(), capture_output=True, text=True, timeout=60, preexec_fn=preexec,
        )  # fmt: skip
        _clean_failure(proc, 2, "run the same command again to resume")
        assert re.search(r"the disk is full|disk I/O error", proc.stderr), proc.stderr
        wait_quiet(sim)
        assert_consistent(db)
        assert_covers_bill(db, sim, bills)
        assert done_before < books(db).done < 1000  # it stopped mid-run, results kept
        with contextlib.suppress(FileNotFoundError):
            (tmp_path / "disk" / "filler").unlink()
        _finish(job, db, sim)
        assert books(db).done == 1000
        assert_consistent(db)
        assert_covers_bill(db, sim, bills)
