"""Hostile conditions around a real ``batchrun``: a job file that changed, a second runner, a
read-only, locked or full database, a misbehaving network, malformed job files and an API key
that must never leak. Each gives a clear message, an exit status and a consistent database."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.simulator import SimulatorThread

from .badcorpus import EXPECTED, materialize
from .books import (
    assert_consistent,
    assert_covers_bill,
    books,
    rows,
    scalar,
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


# -- the job file changed -------------------------------------------------------------------------


def test_a_changed_job_file_is_refused_naming_what_changed_unless_asked_for_a_new_job(
    tmp_path: Path,
) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=1)
    original = job.read_bytes()
    _in_process("run", job, "--db", db, "--cap", "1", "--simulate", "-q", status=0)
    before = db.read_bytes()
    lines = [json.loads(line) for line in original.decode().splitlines()]
    for i in (3, 7):  # two bodies change
        lines[i]["body"]["messages"][-1]["content"] += " (edited)"
    del lines[12]  # one vanishes
    for i in range(3):  # three are added
        extra = json.loads(json.dumps(lines[0]))
        extra["custom_id"] = f"new-{i}"
        lines.append(extra)
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))

    out = batchrun("run", job, "--db", db, "--cap", "1", "--simulate", "-q")
    _clean_failure(out, 2, "2 custom_ids changed, 3 added, 1 vanished", "--new-job")
    assert db.read_bytes() == before

    runner = CliRunner()
    args = ["--db", str(db), "--cap", "1", "--simulate", "-q"]
    out = runner.invoke(main, ["run", str(job), *args, "--new-job"])
    assert out.exit_code == 0, out.output
    assert "imported as job 2" in out.stdout
    # The original content under another path is still job 1 (identity is the content).
    elsewhere = tmp_path / "copy of the job.jsonl"
    elsewhere.write_bytes(original)
    out = runner.invoke(main, ["run", str(elsewhere), *args])
    assert out.exit_code == 0 and "resuming job 1" in out.stdout, out.output
    assert rows(db, "SELECT id, requests FROM jobs ORDER BY id") == [(1, 20), (2, 22)]


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
    with _locked(db):  # held for longer than batchrun's busy timeout (5 s)
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
        time.sleep(6)  # the run's next commit waits its 5 s busy timeout, then gives up
    out, err = proc.communicate(timeout=30)
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
             sim.base_url, "--quiet", "--lease-ttl", "2"],
            env=batchrun_env(), capture_output=True, text=True, timeout=60, preexec_fn=preexec,
        )  # fmt: skip
        _clean_failure(proc, 2, "run the same command again to resume")
        # With the disk full, even releasing the lease can fail: it then expires.
        time.sleep(2.2)
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


# -- network faults -------------------------------------------------------------------------------

# Each fault on 60% of requests, up to 3 attempts a request: most rows succeed after retries,
# about a fifth fail after their third attempt; the run goes on either way.
NETWORK_FAULTS = {
    "closed-mid-response": ({"p_reset_after_bill": 0.6}, "connection", "connection lost"),
    "closed-before-response": ({"p_reset": 0.6}, "connection", "connection lost"),
    "hangs-past-timeout": ({"p_slow": 0.6, "slow_s": 1.0}, "timeout", "timed out"),
    "invalid-json": ({"p_invalid_json": 0.6}, "invalid_response", "unreadable body"),
    "html-error-page": ({"p_html": 0.6}, "server", "HTTP 502"),
}


@pytest.mark.parametrize("fault", list(NETWORK_FAULTS))
def test_network_faults_are_retried_or_failed_cleanly_and_the_run_goes_on(
    tmp_path: Path, make_simulator: SimFactory, fault: str
) -> None:
    config, kind, message = NETWORK_FAULTS[fault]
    sim = make_simulator(seed=11, **config)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, seed=9)
    out = _run(
        job,
        db,
        sim,
        "--concurrency",
        "40",
        "--timeout",
        "0.3",
        "--max-attempts",
        "3",
        "--backoff-base",
        "0.01",
        "--backoff-max",
        "0.05",
    )
    _clean_failure(out, 1)
    b = books(db)
    assert b.done > 0 and b.failed > 0 and b.done + b.failed == 40  # every row finished
    assert scalar(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = ?", kind) > 0
    failures = rows(db, "SELECT error_message FROM results WHERE error_message IS NOT NULL")
    assert len(failures) == b.failed
    assert all(m.startswith("gave up after 3 attempts: ") and message in m for (m,) in failures)
    exported = [
        json.loads(line) for line in batchrun("export", "--db", db).stdout.splitlines()
    ]  # every line valid JSON
    assert len(exported) == 40
    wait_quiet(sim)
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


# -- malformed job files --------------------------------------------------------------------------


def test_every_malformed_job_file_exits_2_with_file_line_and_leaves_the_database_alone(
    tmp_path: Path,
) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 5, seed=10)
    _in_process("run", job, "--db", db, "--cap", "1", "--simulate", "-q", status=0)
    before = db.read_bytes()
    files = materialize(tmp_path / "bad")
    assert len(files) >= 30
    runner = CliRunner()
    for path in files:
        line, field, reason = EXPECTED[path.name]
        result = runner.invoke(
            main,
            ["run", str(path), "--db", str(db), "--cap", "1", "--simulate", "-q"],
            env={"OPENAI_API_KEY": "sk-test-key"},
        )
        where = f"{path.name}: {result.stderr}"
        assert result.exit_code == 2, (where, result.exception)
        assert isinstance(result.exception, SystemExit), (where, result.exception)
        assert f"{path}:{line}: {field}: " in result.stderr, where
        assert reason in result.stderr, where
        assert "Traceback" not in result.output, where
        assert db.read_bytes() == before, where
        assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0, where
    # The installed command behaves the same, as its own process (no traceback on stderr).
    for name in ("gzip_file.jsonl", "truncated_mid_file.jsonl", "unknown_model.jsonl"):
        path = tmp_path / "bad" / name
        line, field, _ = EXPECTED[name]
        out = batchrun("run", path, "--db", db, "--cap", "1", "--simulate", "-q")
        _clean_failure(out, 2, f"{path}:{line}: {field}: ")
        assert db.read_bytes() == before


# -- secrets --------------------------------------------------------------------------------------

SENTINEL = "sk-proj-SENTINEL0123456789abcdefghijKLMNOP"
KEYLIKE = "sk-live-PASTEDKEY9876543210zyxwvutsrqpo"


def test_the_api_key_is_never_written_or_printed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(api_key=SENTINEL)
    wrong_key = make_simulator(api_key="sk-the-other-key-0000000000000")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TMPDIR": str(tmp_path)}
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=12)
    outputs: list[subprocess.CompletedProcess[str]] = []

    def cli(*args: str | Path, base: SimulatorThread = sim) -> subprocess.CompletedProcess[str]:
        full = [str(a) for a in args]
        if args[0] == "run":
            full += ["--base-url", base.base_url]
        out = subprocess.run(
            [BATCHRUN, *full],
            env=batchrun_env(SENTINEL, **env),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs.append(out)
        return out

    assert cli("run", job, "--db", db, "--cap", "1").returncode == 0  # progress log on stderr
    assert cli("status", "--db", db).returncode == 0
    assert cli("status", "--db", db, "--json").returncode == 0
    assert cli("export", "--db", db, "-o", tmp_path / "out.jsonl").returncode == 0
    assert cli("export", "--db", db).returncode == 0
    other = tmp_path / "other.jsonl"
    write_job(other, 10, seed=13)
    denied = cli("run", other, "--db", db, "--cap", "1", base=wrong_key)
    assert denied.returncode == 4 and "API key" in denied.stderr
    # A key-like string where a path or an option value is expected is not echoed back.
    keylike_db = tmp_path / f"{KEYLIKE}.db"
    assert cli("run", job, "--db", keylike_db, "--cap", "1").returncode == 0
    runner = CliRunner()
    for args in (
        ["run", KEYLIKE, "--db", str(db), "--cap", "1"],
        ["run", str(job), "--db", str(db), "--cap", KEYLIKE],
        ["run", str(job), "--db", str(db), "--cap", "1", "--rpm", KEYLIKE],
        ["status", "--db", str(tmp_path / KEYLIKE)],
        ["price", str(job), "--prices", KEYLIKE],
    ):
        result = runner.invoke(main, args, env={"OPENAI_API_KEY": SENTINEL})
        assert result.exit_code == 2, result.output
        assert KEYLIKE not in result.output, args
    for out in outputs:
        for secret in (SENTINEL, KEYLIKE):
            assert secret not in out.stdout + out.stderr, (out.args, secret)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert tmp_path / "out.jsonl" in files and db in files
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path
