"""The lane in use leads (issue 21, point 1): a ``--via batch`` job is priced, estimated,
asked about and shown at Batch API prices, with the synchronous figures once, as the
comparison."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import runner
from runner.money import format_money, usd_to_pico
from runner.pricing import load_price_table
from runner.report import format_plan, format_status, status_json
from runner.settings import Batching, RunSettings, Transport
from runner.simulator import SimulatorThread

from .helpers import run_in_process
from .jobgen import write_job

FAST = Batching(poll_first=0.01, poll_interval=0.05)


def _amounts(text: str) -> set[str]:
    return set(re.findall(r"\$[\d,]+\.?\d*", text))


async def test_a_batch_job_with_a_cap_between_the_lanes_worst_cases_is_shown_at_batch_prices(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    job = tmp_path / "job.jsonl"
    write_job(job, 100, max_tokens=2000, prompt_words=60)
    plan = runner.price(job)
    sync_worst, batch_worst = plan.total.worst_pico, plan.total.batch_worst_pico
    cap = (sync_worst + batch_worst) // 2  # the batch fits, the sync worst case does not
    cap_usd = f"{cap / 10**12:.6f}"
    ran = await run_in_process(
        job, tmp_path / "b.db", simulator.base_url, cap=cap_usd, via="batch", batching=FAST
    )
    assert ran.status.states == {"done": 100}
    estimate = ran.printed[0]
    fits = next(line for line in estimate.splitlines() if "fit under the cap" in line)
    assert "100 of 100" in fits and "at Batch API prices" in fits
    assert format_money(batch_worst) in _amounts(fits)
    assert format_money(sync_worst) not in _amounts(fits)
    # The sync figure appears once, as the comparison, in the plan's lane line.
    sync_lines = [
        line for line in estimate.splitlines() if format_money(sync_worst) in _amounts(line)
    ]
    assert len(sync_lines) == 1 and "synchronous" in sync_lines[0]
    # status leads with batch prices too, and says the sync worst case once.
    with runner.Database(tmp_path / "b.db", readonly=True) as db:
        summary = db.job(1).summary()
    text = format_status(summary)
    assert "at Batch API prices (synchronous: worst case" in text
    js = status_json(summary)
    assert js["lane"] == "batch"
    assert usd_to_pico(js["estimate_worst_usd"]) == batch_worst
    assert usd_to_pico(js["sync_estimate_worst_usd"]) == sync_worst


def test_price_via_batch_gives_the_completion_window_not_a_rate_limit_time(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job.jsonl"
    write_job(job, 10)
    plan = runner.price(job)
    table = load_price_table()
    text = format_plan(plan, table, 500, 200_000, via="batch")
    assert "24h completion window" in text and "wall time" not in text
    assert "at synchronous prices: floor" in text
    assert "minimum wall time" in format_plan(plan, table, 500, 200_000)


def _batch_settings(job: Path, db: Path, sim: SimulatorThread) -> RunSettings:
    return RunSettings(
        cap_pico=usd_to_pico("1"), jobfile=job, db=str(db), quiet=True, via="batch",
        batching=FAST, transport=Transport(base_url=sim.base_url),
    )  # fmt: skip


async def _detach(settings: RunSettings, until: Callable[[], bool]) -> runner.RunResult:
    """Run a batch job and stop it (detach) once ``until()`` holds."""
    stop = asyncio.Event()

    async def stop_then() -> None:
        while not until():
            await asyncio.sleep(0.01)
        stop.set()

    stopper = asyncio.ensure_future(stop_then())
    result = await runner.run_with(settings, api_key="sk-test", stop=stop)
    await stopper
    assert result.outcome is runner.RunOutcome.DETACHED
    return result


async def test_a_batch_run_detached_then_run_again_waits_for_its_batches_without_asking(
    tmp_path: Path, make_simulator
) -> None:
    """A batch console (issue 21, point 2): detaching names the batches left open; running
    the same command again says what it waits for and does not ask to send nothing."""
    sim = make_simulator(batch_lines_per_s=20)  # 100 lines: about 5 s in the batch
    job = tmp_path / "job.jsonl"
    write_job(job, 100)
    settings = _batch_settings(job, tmp_path / "b.db", sim)
    # Stopped once some lines ran: the batch's id is recorded by then.
    first = await _detach(settings, lambda: sim.ledger_snapshot()["batch_lines_billed"] >= 3)
    assert first.message is not None
    assert "detached from 1 open batch(es) holding 100" in first.message
    assert "(batch_" in first.message  # which batch
    asked: list[object] = []
    printed: list[str] = []
    again = await runner.run_with(
        settings, api_key="sk-test", echo=printed.append, confirm=lambda est: asked.append(est)
    )
    assert asked == []  # nothing to send: no question
    assert "waiting for 100 requests in 1 open batch(es)" in printed[0]
    assert again.outcome is runner.RunOutcome.COMPLETE and again.status["by_state"] == {"done": 100}


async def test_cancel_says_which_batches_it_cancelled_and_what_they_had_finished(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(batch_lines_per_s=20)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    write_job(job, 100)
    await _detach(
        _batch_settings(job, db, sim), lambda: sim.ledger_snapshot()["requests_billed"] >= 10
    )
    cancelled = await runner.cancel_with(
        RunSettings(
            cap_pico=0, jobfile=job, db=str(db), quiet=True, via="batch",
            batching=Batching(poll_first=0.01, poll_interval=0.05, cancel=True),
            transport=Transport(base_url=sim.base_url),
        ),
        api_key="sk-test",
    )  # fmt: skip
    done = cancelled.status["by_state"]["done"]
    assert cancelled.outcome is runner.RunOutcome.COMPLETE
    assert cancelled.message == (
        f"cancelled 1 batch(es): {done} of their 100 requests had finished and are recorded "
        f"(the job has spent {format_money(usd_to_pico(cancelled.status['spent_usd']))}); "
        f"{100 - done} request(s) back to pending: run the job again to send them"
    )
    assert sim.ledger_snapshot()["batch_billed_pico"] == usd_to_pico(cancelled.status["spent_usd"])
