"""What ``run``, ``status`` and ``export`` show a person: estimate, progress, books, results."""

from __future__ import annotations

import csv
import json
import re
import socket
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import click
import click.testing
import pytest
from click.testing import CliRunner

from runner.cli import main
from runner.simulator import SimulatorThread

from .badcorpus import EXPECTED, materialize
from .helpers import batchrun, write_job

SimFactory = Callable[..., SimulatorThread]


def test_run_prints_the_estimate_against_the_cap_before_sending(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30)
    out = batchrun("run", job, "--db", db, "--cap", "5", "--base-url", sim.base_url)
    assert out.returncode == 0, out.stderr
    assert "worst case" in out.stdout and "floor" in out.stdout
    assert "30 of 30 pending request(s) fit under the cap at worst case" in out.stdout


def test_without_a_terminal_progress_is_plain_log_lines_and_quiet_silences_it(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5)
    job = tmp_path / "job.jsonl"
    write_job(job, 40)
    out = _invoke("run", job, "--db", tmp_path / "a.db", "--cap", "5", "--base-url", sim.base_url)
    assert out.exit_code == 0
    assert "batchrun: 40/40 (40 ok, 0 failed), " in out.stderr and "spend $" in out.stderr
    assert "\r" not in out.stderr  # no bar redraws in a log file
    quiet = _invoke(
        "run", job, "--db", tmp_path / "b.db", "--cap", "5", "--base-url", sim.base_url, "--quiet"
    )
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_status_json_reports_spend_tokens_errors_and_a_projection(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, max_tokens=64)
    out = _invoke("run", job, "--db", db, "--cap", "0.003", "--base-url", sim.base_url, "--quiet")
    assert out.exit_code == 3
    status = json.loads(_invoke("status", "--db", db, "--json").stdout)["jobs"][0]
    assert status["state"] == "capped"
    assert status["by_state"]["done"] > 0 and status["by_state"]["pending"] > 0
    spent = float(status["spent_usd"])
    assert 0 < spent <= 0.003
    assert spent <= float(status["projected_total_usd"]) <= float(status["estimate_worst_usd"])
    assert status["input_tokens"] > 0 and status["output_tokens"] > 0
    text = _invoke("status", "--db", db).stdout
    assert "capped" in text and "projected total" in text


def test_status_shows_running_with_pid_and_since_when_while_a_runner_holds_the_job(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    from runner.store import open_store

    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 10)
    ran = _invoke("run", job, "--db", db, "--cap", "5", "--base-url", simulator.base_url, "-q")
    assert ran.exit_code == 0
    store = open_store(db)
    try:
        store.register_runner(1, "worker-7", 4242, "sync", 600)
        batch = store.register_runner(1, "worker-8", 4343, "batch", 600)
        store.heartbeat(batch, 600, 40)  # 40 requests in the batches it watches
    finally:
        store.close()
    text = _invoke("status", "--db", db).stdout
    assert "running (pid 4242 on worker-7 since " in text
    assert "pid 4343 (batch): started " in text
    assert "watching 40 request(s) in open batches" in text
    status = json.loads(_invoke("status", "--db", db, "--json").stdout)["jobs"][0]
    assert status["state"] == "running"
    assert [(r["pid"], r["host"]) for r in status["runners"]] == [
        (4242, "worker-7"),
        (4343, "worker-8"),
    ]


def test_export_marks_requests_never_sent_with_an_error_and_keeps_file_order(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 100, max_tokens=64)
    _invoke("run", job, "--db", db, "--cap", "0.002", "--base-url", sim.base_url, "--quiet")
    rows = [json.loads(line) for line in _invoke("export", "--db", db).stdout.splitlines()]
    assert [r["custom_id"] for r in rows] == [f"req-{i:06d}" for i in range(100)]
    sent = [r for r in rows if r["response"]]
    unsent = [r for r in rows if not r["response"]]
    assert sent and unsent
    assert all(r["error"]["code"] == "not_completed" for r in unsent)
    assert len({r["id"] for r in rows}) == 100
    out = tmp_path / "out.jsonl"
    assert batchrun("export", "--db", db, "-o", out).returncode == 0  # the real command
    assert len(out.read_text().splitlines()) == 100


def test_every_option_of_every_command_is_explained_in_help() -> None:
    for name, command in main.commands.items():
        assert command.help, name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"{name} {param.opts}"
        out = _invoke(name, "--help")
        assert out.exit_code == 0 and "Usage: main " + name in out.stdout


def test_status_on_a_missing_database_is_a_clear_error() -> None:
    out = batchrun("status", "--db", "/nonexistent/x.db")
    assert out.returncode == 2
    assert "no such database" in out.stderr and "Traceback" not in out.stderr


# -- malformed job files --------------------------------------------------------------------------


def test_every_malformed_job_file_exits_2_with_file_line_and_leaves_the_database_alone(
    tmp_path: Path,
) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 5, seed=10)
    first = CliRunner().invoke(
        main, ["run", str(job), "--db", str(db), "--cap", "1", "--simulate", "-q"]
    )
    assert first.exit_code == 0, first.output
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
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert f"{path}:{line}: {field}: " in out.stderr
        assert db.read_bytes() == before


# -- conventions: env vars, csv, status by model, the key check ----------------------------------


def _invoke(*args: str | Path, env: dict[str, str] | None = None) -> click.testing.Result:
    """The command in this process (the same code path, without a start-up)."""
    return CliRunner().invoke(
        main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test-key", **(env or {})}
    )


def test_every_option_can_come_from_a_batchrun_environment_variable(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 10)
    env = {"BATCHRUN_CAP": "0.000001", "BATCHRUN_BASE_URL": sim.base_url, "BATCHRUN_DB": str(db)}
    result = _invoke("run", job, "-q", env=env)
    assert result.exit_code == 3, result.output  # the tiny cap came from the environment
    assert "cap of $0.000001" in result.output
    assert "BATCHRUN_MAX_ATTEMPTS" in _invoke("run", "--help").output


def test_csv_export_and_only_ok_or_failed(tmp_path: Path, make_simulator: SimFactory) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    lines = []
    for i in range(6):
        text = "__sim_400__" if i % 3 == 0 else f"question {i}"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                "max_tokens": 8}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    job.write_text("\n".join(lines) + "\n")
    assert _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url).exit_code == 1
    out = tmp_path / "out.csv"
    exported = _invoke("export", "--db", db, "--format", "csv", "-o", out)
    assert exported.exit_code == 0 and exported.output == f"wrote {out}: 6 request(s) of job 1\n"
    rows = list(csv.DictReader(out.open()))
    assert [r["custom_id"] for r in rows] == [f"r{i}" for i in range(6)]
    ok = [r for r in rows if r["status"] == "done"]
    assert len(ok) == 4 and all(r["output_text"] and r["finish_reason"] for r in ok)
    assert all(int(r["input_tokens"]) > 0 and float(r["cost_usd"]) > 0 for r in ok)
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 2 and all("maximum context length" in r["error"] for r in failed)
    only_failed = _invoke("export", "--db", db, "--only", "failed").output.splitlines()
    assert [json.loads(line)["custom_id"] for line in only_failed] == ["r0", "r3"]
    only_ok = _invoke("export", "--db", db, "--only", "ok", "--format", "csv").output
    assert len(only_ok.splitlines()) == 5  # the header and the four results
    listed = _invoke("status", "--db", db, "--failed").output.splitlines()
    assert listed[0] == "job 1: 2 failed request(s)"
    assert [line.split("\t")[:2] for line in listed[1:]] == [
        ["r0", "context_length_exceeded"],
        ["r3", "context_length_exceeded"],
    ]


def test_status_shows_cost_by_model_and_by_endpoint(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, mix=("chat", "embeddings"))
    assert _invoke("run", job, "--db", db, "--cap", "1", "--base-url", sim.base_url).exit_code == 0
    status = json.loads(_invoke("status", "--db", db, "--json").output)["jobs"][0]
    models = status["by_model"]
    assert set(models) == {"gpt-4o-mini", "text-embedding-3-small"}
    assert set(status["by_endpoint"]) == {"/v1/chat/completions", "/v1/embeddings"}
    total = sum(Decimal(m["cost_usd"]) for m in models.values())
    assert total == Decimal(status["spent_usd"])
    text = _invoke("status", "--db", db).output
    assert "models     gpt-4o-mini $" in text and "endpoints  /v1/chat/completions $" in text


def test_the_cap_is_optional_only_on_the_simulator(tmp_path: Path) -> None:
    job = tmp_path / "job.jsonl"
    write_job(job, 3)
    result = _invoke("run", job, "--db", tmp_path / "a.db")
    assert result.exit_code == 2 and "--cap is required" in result.output
    result = _invoke("run", job, "--db", tmp_path / "b.db", "--simulate")
    assert result.exit_code == 0 and "cap $1.00" in result.output


def test_a_missing_key_for_a_local_server_says_any_key_works(tmp_path: Path) -> None:
    job = tmp_path / "job.jsonl"
    write_job(job, 3)
    result = CliRunner().invoke(
        main, ["run", str(job), "--cap", "1", "--base-url", "http://127.0.0.1:9/v1"],
        env={"OPENAI_API_KEY": ""},
    )  # fmt: skip
    assert result.exit_code == 2 and "any value works" in result.output


def test_a_key_the_api_rejects_stops_before_anything_is_imported(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(api_key="sk-the-right-key-000000000000")
    # The same server reached by a name that is not this machine's loopback: a "real" API.
    host_url = sim.base_url.replace("127.0.0.1", socket.gethostname())
    try:
        socket.create_connection((socket.gethostname(), int(sim.base_url.split(":")[2][:-3])), 1)
    except OSError:
        pytest.skip("the simulator listens on loopback only and the hostname is not loopback")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 3)
    result = _invoke("run", job, "--db", db, "--cap", "1", "--base-url", host_url)
    assert result.exit_code == 4 and "rejected the API key" in result.output
    assert not db.exists() and sim.ledger_snapshot()["requests_billed"] == 0


def test_a_cap_too_small_says_what_it_covers_and_the_cap_that_finishes_the_job(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """Up front: how many requests the cap covers. At the stop: the cap that finishes the job
    at worst case; run with that cap, the job finishes."""
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, max_tokens=64)
    args = ("run", job, "--db", db, "--base-url", simulator.base_url)
    first = _invoke(*args, "--cap", "0.003")
    assert first.exit_code == 3
    covers = re.search(r"the cap covers ~([\d,]+) of 200 requests at worst case", first.stdout)
    assert covers is not None and 0 < int(covers[1].replace(",", "")) < 200
    said = re.search(r"A cap of \$([\d.]+) finishes the job at worst case", first.stderr)
    assert said is not None, first.stderr
    assert Decimal(said[1]) > Decimal("0.003")
    second = _invoke(*args, "--cap", said[1])
    assert second.exit_code == 0, second.stderr
    assert "the cap covers" not in second.stdout


def test_status_of_a_job_whose_runner_was_killed_says_interrupted_not_running(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    """After kill -9, and once the runner's heartbeat has expired, ``status`` must not claim
    the job is running: it names the runner as gone and says how to resume."""
    import signal
    import time

    from .helpers import start_run, wait_received

    sim = make_simulator(latency_ms=2000)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 50)
    proc = start_run(job, db, sim, "--heartbeat-ttl", "1", "--concurrency", "4")
    wait_received(sim, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.2)  # past its heartbeat's expiry
    out = _invoke("status", "--db", db)
    assert out.exit_code == 0, out.output
    assert "interrupted (its runner is gone: run the same command again to resume)" in out.stdout
    assert "0 live, 1 gone (heartbeat expired)" in out.stdout
    assert f"pid {proc.pid} (sync)" in out.stdout and "gone (killed or cut off)" in out.stdout
    (status,) = json.loads(_invoke("status", "--db", db, "--json").stdout)["jobs"]
    assert status["state"] == "interrupted"
    assert [r["heartbeat_expired"] for r in status["runners"]] == [True]


def test_export_to_a_reader_that_goes_away_stops_at_once_without_a_traceback(
    tmp_path: Path,
) -> None:
    """``batchrun export | head -1``: the rest of a large export is not read for nobody."""
    import sqlite3
    import subprocess

    from runner.money import usd_to_pico
    from runner.pricing import load_price_table
    from runner.run import open_or_import
    from runner.store import open_store

    from .helpers import BATCHRUN, batchrun_env

    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 3000)
    store = open_store(db)
    open_or_import(store, job, load_price_table(), usd_to_pico("5"), False)
    store.close()
    with sqlite3.connect(db) as conn:  # every request done, with a 1 KB answer
        conn.execute(
            "INSERT INTO results (request_id, status_code, body, finished_at) "
            "SELECT id, 200, ?, 0 FROM requests",
            (json.dumps({"choices": [{"message": {"content": "x" * 1000}}]}),),
        )
        conn.execute("UPDATE requests SET state = 'done'")
    proc = subprocess.Popen(
        [BATCHRUN, "export", "--db", str(db)], env=batchrun_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["custom_id"]
    proc.stdout.close()
    err = proc.stderr.read().decode()
    # 1 (click's status for a closed pipe), not 0: it stopped, it did not write to nobody
    assert proc.wait(timeout=60) == 1
    assert err == ""
