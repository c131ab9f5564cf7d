"""No tracebacks: every input that once crashed batchrun now exits 2 with a message naming what
to fix, and leaves files it must not touch alone."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.simulator import SimulatorThread

from .helpers import BATCHRUN, batchrun_env, write_job

SimFactory = Callable[..., SimulatorThread]


def invoke(*args: str | Path) -> tuple[int, str]:
    """Run the command in this process; a traceback would surface as a non-exit exception."""
    result = CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def chat_line(custom_id: str, **body: object) -> str:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": payload})  # fmt: skip


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.jsonl"
    write_job(path, 5)
    return path


@pytest.mark.parametrize(
    ("cap", "message"),
    [("1e309", "at most $9,000,000"), ("10000000", "at most $9,000,000"), ("nan", "dollar")],
)
def test_an_impossible_cap_is_a_usage_error(job: Path, cap: str, message: str) -> None:
    code, out = invoke("run", job, "--cap", cap, "--simulate")
    assert code == 2 and message in out


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("1e15", "must be a positive integer, got 1000000000000000.0"),
        ("1000000000000000", "at most 10,000,000"),
    ],
)
def test_an_absurd_output_limit_is_a_located_job_file_problem(
    tmp_path: Path, limit: str, message: str
) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(chat_line("a").replace('"hi"}]', f'"hi"}}], "max_completion_tokens": {limit}'))
    for command in ("price", "run"):
        code, out = invoke(
            command, path, *(["--cap", "1", "--simulate"] if command == "run" else [])
        )
        assert code == 2 and f"{path}:1: body.max_completion_tokens: {message}" in out


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[models.gpt-4o-mini]\ninput = "1e30"\n', "more than $100,000 per 1M tokens"),
        ("[models.gpt-4o-mini]\nmax_output = 100000000000000000000\n", "at most 10,000,000"),
    ],
)
def test_an_absurd_price_is_a_price_file_error(
    tmp_path: Path, job: Path, toml: str, message: str
) -> None:
    prices = tmp_path / "p.toml"
    prices.write_text(toml)
    code, out = invoke("price", job, "--prices", prices)
    assert code == 2 and message in out and str(prices) in out


def test_a_bad_base_url_is_a_usage_error(job: Path) -> None:
    code, out = invoke("run", job, "--cap", "1", "--base-url", "http://[::1")
    assert code == 2 and "--base-url" in out and "not a URL" in out


@pytest.mark.parametrize("option", ["--timeout", "--backoff-base", "--backoff-max", "--max-wait"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_seconds_must_be_finite(job: Path, option: str, value: str) -> None:
    code, out = invoke("run", job, "--cap", "1", "--simulate", option, value)
    assert code == 2 and option in out


def _finished_db(tmp_path: Path, job: Path) -> Path:
    db = tmp_path / "run.db"
    assert invoke("run", job, "--db", db, "--simulate", "-q")[0] == 0
    return db


@pytest.mark.parametrize(
    "damage",
    ["DROP TABLE results", "INSERT INTO alembic_version VALUES ('0001')", "DROP TABLE jobs"],
)
def test_a_damaged_database_is_a_clear_error(tmp_path: Path, job: Path, damage: str) -> None:
    db = _finished_db(tmp_path, job)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute(damage)
    for args in (("status",), ("export",), ("run", job, "--simulate")):
        code, out = invoke(*args, "--db", db)
        assert code == 2 and "damaged" in out, (args, out)


def test_export_never_overwrites_the_database(tmp_path: Path, job: Path) -> None:
    db = _finished_db(tmp_path, job)
    before = db.read_bytes()
    for target in (db, Path(f"{db}-wal"), tmp_path / "." / db.name):
        code, out = invoke("export", "--db", db, "-o", target)
        assert code == 2 and "database itself" in out
    assert db.read_bytes() == before


def test_export_into_a_missing_folder_or_a_read_only_one_is_a_clear_error(
    tmp_path: Path, job: Path
) -> None:
    db = _finished_db(tmp_path, job)
    code, out = invoke("export", "--db", db, "-o", tmp_path / "nowhere" / "out.jsonl")
    assert code == 2 and "no such folder" in out
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        if (
            shutil.which("mount") is None
            or subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)],
                capture_output=True,
            ).returncode
        ):
            pytest.skip("root without mount: no read-only folder here")
    else:
        locked.chmod(0o555)
    try:
        code, out = invoke("export", "--db", db, "-o", locked / "out.jsonl")
        assert code == 2 and "cannot write" in out
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], check=True)
        else:
            locked.chmod(0o755)


def test_reading_commands_never_write_into_another_programs_database(tmp_path: Path) -> None:
    db = tmp_path / "theirs.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = db.read_bytes()
    for args in (("status",), ("export",)):
        code, out = invoke(*args, "--db", db)
        assert code == 2 and "not batchrun's" in out
    assert db.read_bytes() == before


def test_a_job_file_that_is_a_pipe_is_refused_clearly(tmp_path: Path) -> None:
    fifo = tmp_path / "job.fifo"
    os.mkfifo(fifo)
    code, out = invoke("run", fifo, "--db", tmp_path / "r.db", "--simulate")
    assert code == 2 and "not a regular file" in out


def test_two_imports_of_the_same_file_at_once_make_one_job(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 1500, seed=1)
    args = [BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
            "-q"]  # fmt: skip
    procs = [
        subprocess.Popen(
            args, env=batchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert "Traceback" not in err and "UNIQUE" not in err
        assert p.returncode in (0, 2), err
        if p.returncode == 2:
            assert "locked" in err  # the other import held the database: a clear message
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    assert sim.ledger_snapshot()["duplicate_bodies"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--job", "1", "--simulate"),
        ("cancel", "--job", "1"),
        ("upgrade",),
        ("status",),
        ("export",),
    ],
    ids=lambda args: args[0],
)
def test_a_mistyped_db_for_a_job_already_in_it_is_an_error_not_a_new_database(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """Only a run that imports a job file creates a database; a command that names a job in
    --db must not leave an empty database behind at a mistyped path."""
    db = tmp_path / "typo.db"
    code, out = invoke(*args, "--db", db)
    assert code == 2
    assert f"{db}: no such database" in out
    assert list(tmp_path.iterdir()) == []
