"""``--via auto`` and ``--deadline``: the Batch API for the bulk, the synchronous API for what
the batches will not finish in time; the plan on fake time, the runs against the simulator."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.deadline import (
    TailLimits,
    make_plan,
    planned_seconds,
    resolve,
    switch_due,
    sync_seconds,
)
from runner.durations import parse_duration
from runner.errors import UsageError
from runner.report import deadline_plan_json, format_deadline_plan, format_status
from runner.settings import Batching, Deadline, Limits, Retry
from runner.simulator import SimulatorThread

from .books import assert_consistent, assert_covers_bill, books, rows, scalar, watch_bills
from .helpers import BATCHRUN, Ran, batchrun, batchrun_env, run_in_process, write_job

MakeSim = Callable[..., SimulatorThread]
POLL = {"poll_first": 0.05, "poll_interval": 0.25}


async def run_auto(
    job: Path | None, db: Path, sim: SimulatorThread, deadline: str | None = None, **kw: Any
) -> Ran:
    batching = Batching(**{**POLL, **kw.pop("batching", {})})
    kw.setdefault("retry", Retry(max_attempts=20, backoff_base=0.01, backoff_max=0.05))
    plan = {"margin": 0.1, "slack": 2.0, "tick": 0.2, "cancel": 1.0, **kw.pop("plan", {})}
    spec = Deadline(spec=deadline, **plan)
    return await run_in_process(
        job, db, sim.base_url, via="auto", batching=batching, deadline=spec, **kw
    )


def batch_results(db: Path) -> int:
    return scalar(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%batch%'")


# -- the plan, on fake time ---------------------------------------------------------------------


def test_durations_and_iso_times() -> None:
    assert parse_duration("90s") == 90 and parse_duration("8h") == 8 * 3600
    assert parse_duration("1h30m") == 5400 and parse_duration("1.5h") == 5400
    assert parse_duration("250ms") == 0.25 and parse_duration("2d") == 172800
    for bad in ("", "h", "90", "1h 30m", "s90", "-5s"):
        assert parse_duration(bad) is None, bad
    assert resolve("90s", 1000.0) == 1090.0
    assert resolve("2026-12-03T08:00:00Z", 0) == 1796284800.0
    assert resolve("2026-12-03T09:00:00+01:00", 0) == 1796284800.0
    with pytest.raises(UsageError, match="ISO time"):
        resolve("tomorrow", 0)
    with pytest.raises(UsageError, match="above zero"):
        resolve("0s", 0)


def test_the_sync_tail_counts_the_full_bucket_then_the_rate() -> None:
    limits = TailLimits(rpm=120, tpm=None)
    assert sync_seconds(0, 0, limits) == 0
    assert sync_seconds(100, 0, limits, latency=0.5) == 0.5  # all in the first minute's burst
    assert sync_seconds(300, 0, limits, latency=0.5) == 90.5  # 120 at once, 180 at 2/s
    # Tokens bind when they are the tighter limit.
    assert sync_seconds(300, 300_000, TailLimits(rpm=10_000, tpm=100_000), latency=0) == 120
    # A concurrency bound is no bucket: no burst.
    assert sync_seconds(120, 0, TailLimits(rpm=60, tpm=None, source="concurrency"), 0) == 120
    assert sync_seconds(5, 0, TailLimits(None, None, "unknown")) is None
    assert planned_seconds(100, Deadline(margin=0.25, slack=15)) == 140


def test_the_switch_comes_when_the_time_left_is_down_to_the_planned_tail() -> None:
    deadline = Deadline(at=1000.0, margin=0.1, slack=2.0)
    limits = TailLimits(rpm=240, tpm=None)
    # 400 left: 240 at once, 160 at 4/s = 40 s (+1 latency), planned 1.1 x 41 + 2 = 47.1 s.
    assert not switch_due(1000 - 47.2, deadline, 400, 0, limits, 1.0)
    assert switch_due(1000 - 47.0, deadline, 400, 0, limits, 1.0)
    # Within the burst only latency and slack remain.
    assert not switch_due(1000 - 4.0, deadline, 200, 0, limits, 1.0)
    assert switch_due(1000 - 3.0, deadline, 200, 0, limits, 1.0)
    assert not switch_due(999.9, deadline, 0, 0, limits, 1.0)  # nothing left: no switch
    assert switch_due(0.0, deadline, 5, 0, TailLimits(None, None, "unknown"), 1.0)


def test_the_plan_says_the_latest_switch_and_the_cost_range() -> None:
    deadline = Deadline(spec="90s", at=1090.0, margin=0.1, slack=2.0)
    plan = make_plan(deadline, 1000.0, 400, 40_000, TailLimits(240, None), (5, 10), (10, 20))
    assert plan.tail_seconds == 41.0 and plan.planned == pytest.approx(47.1)
    assert plan.latest_switch == pytest.approx(1042.9) and plan.feasible
    text = format_deadline_plan(plan)
    assert "latest switch" in text and "cost range" in text and "240 RPM (given)" in text
    out = deadline_plan_json(plan)
    assert out["latest_switch"] == pytest.approx(1042.9) and out["feasible"] is True
    assert out["cost_range_usd"] == ["0.000000000005", "0.00000000002"]
    late = make_plan(
        Deadline(spec="10s", at=1010.0), 1000.0, 4000, 0, TailLimits(240, None), (5, 10), (10, 20)
    )
    assert late.feasible is False
    assert "cannot be met even all sync" in format_deadline_plan(late)


# -- runs against the simulator -----------------------------------------------------------------


async def test_auto_without_a_deadline_sends_the_stragglers_synchronously(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Lines that expire in their batch go through the synchronous API at once, not into a
    second batch."""
    sim = make_simulator(batch_lines_per_s=100, batch_window_s=0.5)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "a.db"
    write_job(job, 120, seed=1)
    ran = await run_auto(job, db, sim)
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 120}
    ledger = sim.ledger_snapshot()
    assert ledger["batches_created"] == 1  # no second batch for the stragglers
    assert 0 < ledger["batch_lines_billed"] < 120
    assert ledger["requests_billed"] == 120 and ledger["duplicate_bodies"] == 0
    assert batch_results(db) == ledger["batch_lines_billed"]
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


async def test_a_quick_batch_api_finishes_the_deadline_job_at_half_price(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    sim = make_simulator(batch_lines_per_s=50_000, rpm=600)
    job, db = tmp_path / "job.jsonl", tmp_path / "q.db"
    write_job(job, 400, seed=2)
    ran = await run_auto(job, db, sim, "120s", limits=Limits(rpm=600))
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 400}
    ledger = sim.ledger_snapshot()
    assert ledger["batch_lines_billed"] == 400 and ledger["duplicate_bodies"] == 0
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert "latest switch" in ran.output
    assert_consistent(db)


async def test_a_slow_batch_api_is_cancelled_in_time_and_the_rest_goes_sync(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Batches that run 10 lines/s across them cannot finish 300 requests in 30 s: they are
    cancelled when the time left is down to the sync tail, what they finished is billed at
    batch prices, and the job finishes by the deadline, below all-sync."""
    sim = make_simulator(batch_shared_lines_per_s=10.0, rpm=240, batch_finalize_s=0.2)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "s.db"
    write_job(job, 300, seed=3)
    # The sync tail is ~18.5 s (a full bucket of 240, then 60 at 4/s, +10% +2 s): a 30 s
    # deadline leaves the batches ~11 s, time enough to finish some lines even on a busy
    # machine, never all 300.
    ran = await run_auto(
        job, db, sim, "30s", limits=Limits(rpm=240), batching={"requests_per_batch": 100}
    )
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 300}
    # The switch came before the deadline, and the job finished within the 10 s of it.
    (detail,) = rows(db, "SELECT detail FROM events WHERE kind = 'deadline'")[0]
    deadline_at = float(detail.rpartition("|")[2])
    (switched,) = rows(db, "SELECT at FROM events WHERE kind = 'deadline_switch'")[0]
    assert switched < deadline_at
    assert rows(db, "SELECT MAX(finished_at) FROM results")[0][0] <= deadline_at + 10
    ledger = sim.ledger_snapshot()
    assert 0 < ledger["batch_lines_billed"] < 300
    assert ledger["requests_billed"] == 300 and ledger["duplicate_bodies"] == 0
    assert books(db).ledger_pico == ledger["billed_pico"]
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    # status shows the lanes: what each finished, at what cost, the switch, the saving.
    lanes = ran.report.status["lanes"]
    assert lanes["batch"]["results"] == ledger["batch_lines_billed"]
    assert lanes["batch"]["results"] + lanes["sync"]["results"] == 300
    assert lanes["switched_at"] == pytest.approx(switched)
    assert float(lanes["saved_usd"]) > 0
    assert "switched to sync at" in format_status(ran.status)


def test_price_prints_the_deadline_plan_without_sending(tmp_path: Path) -> None:
    job = tmp_path / "job.jsonl"
    write_job(job, 1000, seed=4)
    out = batchrun("price", job, "--deadline", "2h", "--rpm", "500")
    assert out.returncode == 0, out.stderr
    assert "latest switch" in out.stdout and "all by batch" in out.stdout
    data = json.loads(batchrun("price", job, "--deadline", "2h", "--rpm", "500", "--json").stdout)
    plan = data["deadline"]
    assert plan["requests"] == 1000 and plan["feasible"] is True
    assert plan["sync_tail_seconds"] == pytest.approx(60 + 1.0)
    late = batchrun("price", job, "--deadline", "30s", "--rpm", "10")
    assert "cannot be met even all sync" in late.stdout
    bad = batchrun("price", job, "--deadline", "soon")
    assert bad.returncode == 2 and "ISO time" in bad.stderr


# -- kill -9 at each step of the switch -----------------------------------------------------------


def _auto_args(job: Path, db: Path, sim: SimulatorThread) -> list[str]:
    return [
        BATCHRUN, "run", str(job), "--db", str(db), "--cap", "5", "--base-url", sim.base_url,
        "--via", "auto", "--deadline", "8s", "--rpm", "240", "--deadline-margin", "0.1",
        "--deadline-slack", "2", "--deadline-cancel", "1", "--poll-interval", "0.05",
        "--backoff-base", "0.01", "--backoff-max", "0.05", "--batch-requests", "50",
    ]  # fmt: skip


@pytest.mark.parametrize("step", ["cancelling:1", "cancelled:1", "finalizing:1"])
def test_kill_9_at_each_step_of_the_switch_then_the_same_command_resumes(
    tmp_path: Path, make_simulator: MakeSim, step: str
) -> None:
    """Killed while cancelling, between the cancel and the first synchronous send, and while a
    cancelled batch is still finalizing: the same command finishes the job, nothing is sent
    twice, and the books never fall below the bill."""
    sim = make_simulator(batch_shared_lines_per_s=10.0, rpm=240, batch_finalize_s=0.5)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "k.db"
    write_job(job, 150, seed=5)
    args = _auto_args(job, db, sim)
    env = batchrun_env(BATCHRUN_KILL_AT=step)
    killed = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, (step, killed.returncode, killed.stderr)
    assert scalar(db, "SELECT COUNT(*) FROM events WHERE kind = 'deadline_switch'") == 1
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)
    resumed = subprocess.run(args, env=batchrun_env(), capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    ledger = sim.ledger_snapshot()
    b = books(db)
    assert (b.done, b.pending, b.reserved, b.failed) == (150, 0, 0, 0)
    assert ledger["duplicate_bodies"] == 0  # nothing sent (and billed) twice
    assert all(n == 1 for n in bills.times.values()) and len(bills.times) == 150
    assert 0 < ledger["batch_lines_billed"] < 150
    assert b.ledger_pico == ledger["billed_pico"]  # books == bill
    assert_consistent(db)


async def test_a_deadline_not_even_all_sync_can_meet_is_said_in_the_question(
    tmp_path: Path, make_simulator: MakeSim
) -> None:
    """Issue 19, point 2: the run asks (and says so) before going all sync at once."""
    from runner import run_with
    from runner.errors import Declined
    from runner.money import usd_to_pico
    from runner.report import confirm_question
    from runner.settings import RunSettings, Transport

    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 400)
    asked: list[str] = []

    def confirm(est: Any) -> bool:
        asked.append(confirm_question(est))
        return False

    settings = RunSettings(
        cap_pico=usd_to_pico("5"), jobfile=job, db=str(db), quiet=True, via="auto",
        limits=Limits(rpm=60), deadline=Deadline(spec="30s"), batching=Batching(**POLL),
        transport=Transport(base_url=sim.base_url),
    )  # fmt: skip
    with pytest.raises(Declined):
        await run_with(settings, confirm=confirm, api_key="sk-test")
    (question,) = asked
    assert question.startswith("The deadline cannot be met even all sync at the limits: Send ")
    assert question.endswith(", all sync, as fast as the limits allow?")
    assert sim.ledger_snapshot()["requests_received"] == 0  # nothing sent before the answer
