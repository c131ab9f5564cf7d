"""The lane in use leads (issue 21, point 1): a ``--via batch`` job is priced, estimated,
asked about and shown at Batch API prices, with the synchronous figures once, as the
comparison."""

from __future__ import annotations

import re
from pathlib import Path

import runner
from runner.money import format_money, usd_to_pico
from runner.pricing import load_price_table
from runner.report import format_plan, format_status, status_json
from runner.settings import Batching
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
