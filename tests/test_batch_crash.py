"""``--via batch`` as a user runs it: kill -9 at every step of submitting and collecting a
batch, Ctrl-C (detach) and ``batchrun cancel``, each followed by the same command again.

Whatever the moment, the resumed run must never submit a chunk twice (no two batches carry the
same chunk tag, no request body billed twice) and must record every result exactly once."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import openai

from runner.engine import RunOutcome
from runner.run import cancel_job
from runner.settings import Batching, Retry, RunSettings, Transport
from runner.simulator import SimulatorThread

from .books import (
    BillsByBody,
    assert_consistent,
    assert_covers_bill,
    body_digest,
    books,
    rows,
    scalar,
    watch_bills,
)
from .helpers import BATCHRUN, batchrun, batchrun_env, run_in_process, write_job

MakeSim = Callable[..., SimulatorThread]


def _args(job: Path, db: Path, sim: SimulatorThread, *extra: str) -> list[str]:
    return [
        BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
        "--via", "batch", "--poll-interval", "0.05", "--backoff-base", "0.01",
        "--backoff-max", "0.05", *extra,
    ]  # fmt: skip


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=batchrun_env(**env), capture_output=True, text=True, timeout=60)


def _sim_batches(sim: SimulatorThread) -> list[openai.types.Batch]:
    client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
    try:
        return list(client.batches.list(limit=100))
    finally:
        client.close()


def _input_files(sim: SimulatorThread) -> list[str]:
    client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
    try:
        return [f.id for f in client.files.list(purpose="batch")]
    finally:
        client.close()


def _wait_idle(sim: SimulatorThread, timeout: float = 20.0) -> None:
    """Until no batch is still running at the simulator (a killed client's batches go on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = sim.ledger_snapshot()["batches"]
        if not any(counts[s] for s in ("validating", "in_progress", "finalizing", "cancelling")):
            return
        time.sleep(0.02)
    raise AssertionError("batches still running at the simulator")


def _assert_each_chunk_once_and_every_result_once(
    db: Path, sim: SimulatorThread, bills: BillsByBody, n: int
) -> None:
    batches = _sim_batches(sim)
    tags = collections.Counter((b.metadata or {}).get("batchrun_tag") for b in batches)
    assert tags and max(tags.values()) == 1, f"a chunk was submitted twice: {tags}"
    recorded = {t for (t,) in rows(db, "SELECT tag FROM batches WHERE batch_id IS NOT NULL")}
    assert set(tags) == recorded  # every batch created is known to the database, and no other
    b = books(db)
    assert (b.done, b.pending, b.reserved, b.failed) == (n, 0, 0, 0)
    assert scalar(db, "SELECT COUNT(*) FROM results") == n
    for (body,) in rows(db, "SELECT body FROM requests"):
        assert bills.times.get(body_digest(body)) == 1, "a request was billed twice (or never)"
    assert b.ledger_pico == sim.ledger_snapshot()["billed_pico"]
    assert_consistent(db)
    assert _input_files(sim) == []  # no uploaded file is left that no batch uses


async def _resume(job: Path, db: Path, sim: SimulatorThread, per_batch: int) -> int:
    """The same command, run to its end with the library (no subprocess needed to resume)."""
    ran = await run_in_process(
        job, db, sim.base_url, cap="5", via="batch",
        batching=Batching(requests_per_batch=per_batch, poll_first=0.01, poll_interval=0.05),
        retry=Retry(max_attempts=50, backoff_base=0.01, backoff_max=0.05),
    )  # fmt: skip
    return ran.exit_code


async def test_kill_9_at_each_step_then_resume_never_submits_a_chunk_twice(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """One job, killed at every step in turn; each run resumes what the last one left."""
    sim = make_simulator(batch_lines_per_s=50_000)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 1800, seed=11, prompt_words=8)
    args = _args(job, db, sim, "--batch-requests", "600")  # 3 chunks
    steps = [
        "uploading:2",  # chunk 2 recorded, its file not uploaded: given up (abandoned) next run
        "created:1",  # its batch exists at OpenAI, its id not recorded: found by tag next run
        "uploaded:1",  # uploaded, its file id not recorded: abandoned, the file swept
        "downloading:1",  # 500 results of a 600-line file committed, 100 not yet
        "polled:2",  # while watching
    ]
    for step in steps:
        killed = _run(args, BATCHRUN_KILL_AT=step)
        assert killed.returncode == -signal.SIGKILL, (step, killed.returncode, killed.stderr)
        _wait_idle(sim)
        assert_consistent(db)
        assert_covers_bill(db, sim, bills)
        if step == "downloading:1":
            assert scalar(db, "SELECT COUNT(*) FROM results") == 500
    assert await _resume(job, db, sim, 600) == 0
    _wait_idle(sim)
    _assert_each_chunk_once_and_every_result_once(db, sim, bills, 1800)
    # Three batches ran: the one created before a kill was re-attached, never created again.
    assert sim.ledger_snapshot()["batches_created"] == 3
    assert scalar(db, "SELECT COUNT(*) FROM batches WHERE state = 'abandoned'") == 2


async def test_kill_9_at_random_moments_then_resume(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    seed = int(os.environ.get("BATCHRUN_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    sim = make_simulator(batch_lines_per_s=30, batch_validate_s=0.05, batch_p_500=0.05, seed=seed)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 200, seed=seed, prompt_words=8)
    args = _args(job, db, sim, "--batch-requests", "30", "--max-attempts", "50")
    for _ in range(2):
        proc = subprocess.Popen(
            args, env=batchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _, err = proc.communicate(timeout=rng.uniform(0.8, 2.5))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
        else:  # it finished before its kill: fine, if it finished well
            assert proc.returncode == 0, (seed, err.decode())
            break
        _wait_idle(sim)
        if not db.exists() or not rows(db, "SELECT 1 FROM sqlite_master WHERE name = 'requests'"):
            assert sim.ledger_snapshot()["batches_created"] == 0  # killed before the import
            continue
        assert_consistent(db)
        assert_covers_bill(db, sim, bills)
    assert await _resume(job, db, sim, 30) == 0, seed
    _wait_idle(sim)
    _assert_each_chunk_once_and_every_result_once(db, sim, bills, 200)


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, env=batchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(proc: subprocess.Popen[str], done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)


def test_ctrl_c_detaches_and_the_same_command_reattaches(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    # 30 lines a batch at 5 lines/s: 6 s each, so both are still open when the run detaches,
    # however slow the machine is to stop.
    sim = make_simulator(batch_lines_per_s=5)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 60, seed=12, prompt_words=8)
    args = _args(job, db, sim, "--batch-requests", "30")
    proc = _start(args)
    _wait_for(proc, lambda: sim.ledger_snapshot()["batches_created"] >= 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "keep running at OpenAI and are billed there" in err
    assert "Run the same command again to re-attach" in err
    assert "Traceback" not in err
    assert "(2 open)" in out  # status lists the batches
    assert books(db).reserved == 60 and scalar(db, "SELECT COUNT(*) FROM batches") == 2
    assert_consistent(db)
    # The batches go on at the simulator while nobody watches; the same command re-attaches.
    final = _run(args)
    assert final.returncode == 0, final.stderr
    assert sim.ledger_snapshot()["batches_created"] == 2  # re-attached, not resubmitted
    _wait_idle(sim)
    _assert_each_chunk_once_and_every_result_once(db, sim, bills, 60)


async def test_cancel_records_the_partial_results_and_the_rest_runs_later(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator(batch_lines_per_s=50)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 100, seed=13, prompt_words=8)
    proc = _start(_args(job, db, sim))
    _wait_for(proc, lambda: sim.ledger_snapshot()["batch_lines_billed"] >= 10)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    sim.configure(batch_lines_per_s=5)  # the batch runs on, slowly, until it is cancelled
    printed: list[str] = []
    settings = RunSettings(
        cap_pico=0, db=str(db), transport=Transport(base_url=sim.base_url), quiet=True,
        batching=Batching(poll_first=0.01, poll_interval=0.05, cancel=True),
    )  # fmt: skip
    os.environ.setdefault("OPENAI_API_KEY", "sk-test")
    report, store, found = await cancel_job(settings, printed.append, signals=False)
    try:
        status = store.status(found.id)
    finally:
        store.close()
    assert report.outcome is RunOutcome.COMPLETE, report.message
    assert [(x.status, x.state) for x in status.batches] == [("cancelled", "closed")]
    b = books(db)
    billed = sim.ledger_snapshot()["batch_lines_billed"]
    assert 10 <= b.done == billed < 100 and b.reserved == 0 and b.done + b.pending == 100
    assert b.ledger_pico == sim.ledger_snapshot()["billed_pico"]
    assert_consistent(db)
    sim.configure(batch_lines_per_s=50_000)
    assert await _resume(job, db, sim, 50_000) == 0
    _wait_idle(sim)
    _assert_each_chunk_once_and_every_result_once(db, sim, bills, 100)


def test_run_help_documents_the_batch_options() -> None:
    out = batchrun("run", "--help")
    assert out.returncode == 0
    for option in ("--via [sync|batch|auto]", "--batch-requests", "--poll-interval",
                   "--batch-queue-tokens"):  # fmt: skip
        assert option in out.stdout
    cancel = batchrun("cancel", "--help")
    assert cancel.returncode == 0 and cancel.stdout.count("Example:") == 1


async def test_a_waiting_batch_runner_takes_over_the_batches_of_one_killed(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """A Batch API runner joins a job whose batches a runner process watches; that process is
    killed with SIGKILL; the one left re-attaches its batches and records every result once."""
    sim = make_simulator(batch_lines_per_s=8)  # each batch runs ~5 s: the kill comes first
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 80, seed=23, prompt_words=8)
    victim = _start(_args(job, db, sim, "--batch-requests", "40"))
    _wait_for(victim, lambda: sim.ledger_snapshot()["batches_created"] >= 2)
    joined = asyncio.ensure_future(
        run_in_process(
            None, db, sim.base_url, job_id=1, via="batch",
            batching=Batching(poll_first=0.01, poll_interval=0.05),
        )
    )  # fmt: skip
    while scalar(db, "SELECT COUNT(*) FROM runners WHERE state = 'live'") < 2:
        assert not joined.done(), joined.result().message
        await asyncio.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    ran = await asyncio.wait_for(joined, 60)
    assert ran.exit_code == 0, ran.message
    (joined_id,) = rows(db, "SELECT id FROM runners WHERE pid = ?", os.getpid())[0]
    assert rows(db, "SELECT DISTINCT watcher FROM batches") == [(joined_id,)]  # taken over
    _wait_idle(sim)
    _assert_each_chunk_once_and_every_result_once(db, sim, bills, 80)
