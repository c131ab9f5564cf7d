"""Requests without an output limit under a tight cap (issue 17, point 4).

A request without ``max_tokens`` is priced at its model's largest output, so its worst case is
about a hundred times what it really costs. A request may go while settled + reserved + its
worst case stays under the cap: as the requests in flight settle, room frees up again, and the
run must keep claiming. It stops at the cap only when nothing is in flight and the next request's
worst case does not fit on top of what was really spent.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from runner.engine import RunOutcome
from runner.money import usd_to_pico
from runner.pricing import load_price_table
from runner.settings import Limits
from runner.simulator import SimulatorThread

from .helpers import ledger_total, query, result_costs, run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]
MODEL = "gpt-4o-mini"
N = 300
# About 520 prompt tokens and a short answer: about $0.00009 each, against a worst case of about
# $0.0098 at gpt-4o-mini's largest output.
PROMPT_WORDS = 400


def unlimited_job(tmp_path: Path) -> tuple[Path, Path]:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, N, max_tokens=0, prompt_words=PROMPT_WORDS, model=MODEL, seed=3)
    return job, db


def check_worst_cases(db: Path) -> int:
    """Every request is priced at the model's largest output, as the price table has it; the
    largest worst case of the job."""
    price = load_price_table().resolve(MODEL)
    assert price.max_output is not None and price.max_output > 0
    rows = query(db, "SELECT input_tokens, output_limit, worst_pico FROM requests")
    assert len(rows) == N
    for input_tokens, output_limit, worst in rows:
        assert output_limit == price.max_output
        assert worst == price.bounds(input_tokens, price.max_output)[1]
    return max(worst for _, _, worst in rows)


async def test_a_tight_cap_is_filled_up_to_one_worst_case_before_the_run_stops(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5, latency_jitter=0.5)
    job, db = unlimited_job(tmp_path)
    cap = "0.02"  # room for two worst cases at once, and for about a hundred real answers
    ran = await run_in_process(job, db, sim.base_url, cap=cap, limits=Limits(concurrency=64))
    cap_pico = usd_to_pico(cap)
    worst = check_worst_cases(db)
    assert 2 * worst < cap_pico < 3 * worst  # the arithmetic this test is about

    assert ran.report.outcome is RunOutcome.CAPPED, ran.message
    assert ran.exit_code == 3 and "cap" in (ran.message or "")
    ledger = sim.ledger_snapshot()
    settled = ran.status.spend.settled_pico
    # The books are exact (no unknown outcomes here) and equal the server's bill.
    assert settled == ledger["billed_pico"] == ledger_total(db) == result_costs(db)
    assert ledger["requests_billed"] == ledger["requests_received"] == ran.status.states["done"]
    assert ran.status.spend.reserved_pico == 0
    # Never past the cap, and filled to within one worst case of it: the run stopped only
    # because the next request's worst case no longer fits on top of what was spent.
    assert settled <= cap_pico
    assert settled >= cap_pico - worst
    (next_worst,) = query(
        db, "SELECT worst_pico FROM requests WHERE state = 'pending' ORDER BY seq LIMIT 1"
    )[0]
    assert settled + next_worst > cap_pico
    # Far more than the worst case alone would allow (before the fix: 8 to 32 requests).
    done = ran.status.states["done"]
    assert done > 3 * cap_pico // worst
    assert 0 < ran.status.states["pending"] == N - done
    # The simulator's real answers cost what the issue describes.
    assert Decimal(settled) / done < Decimal(worst) / 50


async def test_a_cap_with_room_for_the_job_plus_one_worst_case_completes_it(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5, latency_jitter=0.5)
    job, db = unlimited_job(tmp_path)
    cap = "0.05"
    ran = await run_in_process(job, db, sim.base_url, cap=cap, limits=Limits(concurrency=64))
    cap_pico = usd_to_pico(cap)
    worst = check_worst_cases(db)
    ledger = sim.ledger_snapshot()
    settled = ran.status.spend.settled_pico
    assert settled == ledger["billed_pico"] == ledger_total(db) == result_costs(db)
    # The job's real cost leaves room for a worst case under the cap, so every request fits
    # on top of what the ones before it really cost.
    assert settled + worst <= cap_pico
    assert ran.report.outcome is RunOutcome.COMPLETE and ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": N}
    assert ledger["requests_billed"] == N and ledger["duplicate_bodies"] == 0
