"""The run engine in-process: the library drives the sync backend against the real simulator
over HTTP, with a real SQLite file. The simulator's billing ledger is the independent check of
the books."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from runner.engine import RunOutcome
from runner.settings import Limits, Retry
from runner.simulator import SimulatorThread

from .helpers import ledger_total, query, result_costs, run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]
FAST_RETRY = Retry(max_attempts=20, backoff_base=0.005, backoff_max=0.05)


def billed(sim: SimulatorThread) -> int:
    return sim.ledger_snapshot()["billed_pico"]


async def test_a_1000_request_job_completes_with_books_equal_to_the_servers_bill(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 1000, mix=("chat", "responses", "embeddings"), seed=1)
    ran = await run_in_process(job, db, sim.base_url, limits=Limits(concurrency=64))
    assert ran.exit_code == 0, ran.message
    # exactly one result per custom_id
    rows = query(db, "SELECT r.custom_id, COUNT(s.request_id) FROM requests r "
                     "LEFT JOIN results s ON s.request_id = r.id GROUP BY r.id")  # fmt: skip
    assert len(rows) == 1000 and all(n == 1 for _, n in rows)
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 1000
    assert ledger["duplicate_bodies"] == 0
    assert result_costs(db) == ledger["billed_pico"] == ledger_total(db)
    assert ran.status.spend.settled_pico == ledger["billed_pico"]


async def test_resuming_a_finished_job_sends_nothing(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 50)
    assert (await run_in_process(job, db, sim.base_url)).exit_code == 0
    first = sim.ledger_snapshot()["requests_received"]
    again = await run_in_process(job, db, sim.base_url)
    assert again.exit_code == 0
    assert "resuming job 1" in again.output and "nothing is left to send" in again.output
    assert sim.ledger_snapshot()["requests_received"] == first


async def test_the_same_content_under_another_path_is_the_same_job(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20)
    assert (await run_in_process(job, db, sim.base_url)).exit_code == 0
    moved = tmp_path / "moved.jsonl"
    job.rename(moved)
    again = await run_in_process(moved, db, sim.base_url)
    assert again.exit_code == 0 and "resuming job 1" in again.output
    assert query(db, "SELECT COUNT(*) FROM jobs") == [(1,)]


async def test_a_job_over_its_cap_stops_with_exit_3_and_never_bills_past_the_cap(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=5, latency_jitter=0.5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, max_tokens=64, seed=2)
    cap = "0.005"  # about a third of the worst case
    ran = await run_in_process(job, db, sim.base_url, cap=cap, limits=Limits(concurrency=64))
    assert ran.exit_code == 3 and "spend cap" in (ran.message or "")
    cap_pico = int(Decimal(cap) * 10**12)
    assert 0 < billed(sim) <= cap_pico
    assert ledger_total(db) == billed(sim)  # no unknown outcomes here: books are exact
    done = ran.status.states["done"]
    assert 0 < done < 300
    # A later run with a higher cap continues and never pays for a body twice.
    ran = await run_in_process(job, db, sim.base_url, cap="1", limits=Limits(concurrency=64))
    assert ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 300
    assert ledger["duplicate_bodies"] == 0
    assert ledger_total(db) == ledger["billed_pico"]


async def test_a_request_bigger_than_the_whole_cap_is_never_sent(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 5, max_tokens=10_000)
    ran = await run_in_process(job, db, sim.base_url, cap="0.000001")
    assert ran.exit_code == 3
    assert sim.ledger_snapshot()["requests_received"] == 0
    assert "0 of 5 pending request(s) fit under the cap" in ran.output


async def test_injected_429s_500s_and_resets_are_retried_and_costs_stay_exact(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_429=0.3, p_500=0.05, p_reset=0.03, p_429_retry_ms=5, seed=7)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 500, seed=3)
    ran = await run_in_process(job, db, sim.base_url, retry=FAST_RETRY)
    assert ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ledger["status_counts"].get("429", 0) > 100
    assert ledger["requests_billed"] == 500
    # Every result's cost is exactly what the server billed for it...
    assert result_costs(db) == ledger["billed_pico"]
    # ...and resets (outcome unknown to the client) are charged on top: never under-reported.
    assert ledger_total(db) >= ledger["billed_pico"]
    attempts = query(db, "SELECT COUNT(*) FROM attempts")[0][0]
    assert attempts > 650  # every attempt is recorded


async def test_responses_billed_but_lost_are_charged_at_worst_case(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_reset_after_bill=0.1, p_invalid_json=0.05, seed=11)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=4)
    ran = await run_in_process(job, db, sim.base_url, retry=FAST_RETRY)
    assert ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ledger["duplicate_bodies"] > 0  # the server billed lost replies, then the retries
    assert ledger_total(db) >= ledger["billed_pico"]
    unknown = query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0]
    assert unknown >= ledger["duplicate_bodies"]


def _job_lines(path: Path, texts: list[str]) -> None:
    lines = []
    for i, text in enumerate(texts):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}],
                "max_tokens": 8}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


async def test_rows_the_api_rejects_fail_with_its_message_and_the_rest_succeed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    _job_lines(job, ["__sim_400__ please" if i % 5 == 0 else f"question {i}" for i in range(20)])
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.exit_code == 1, ran.message
    failed = query(
        db,
        "SELECT r.custom_id, s.status_code, s.error_message, r.attempts "
        "FROM requests r JOIN results s ON s.request_id = r.id "
        "WHERE r.state = 'failed' ORDER BY r.seq",
    )
    assert [f[0] for f in failed] == ["r0", "r5", "r10", "r15"]
    assert all(f[1] == 400 and "maximum context length" in f[2] and f[3] == 1 for f in failed)


SENTINEL = "sk-SENTINEL-abcdefghijklmnop0123456789"


async def test_a_rejected_key_stops_the_run_with_exit_4_and_is_never_stored(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(api_key="sk-the-right-key-000000000000", latency_ms=20)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 500)
    started = time.monotonic()
    ran = await run_in_process(job, db, sim.base_url, key=SENTINEL, limits=Limits(concurrency=16))
    assert ran.exit_code == 4
    assert time.monotonic() - started < 10
    assert "API key" in (ran.message or "")
    assert SENTINEL not in ran.output + (ran.message or "")
    assert SENTINEL.encode() not in db.read_bytes()
    assert sim.ledger_snapshot()["status_counts"].get("401", 0) <= 16 + 1


async def test_exhausted_quota_stops_the_run_with_exit_4(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(quota_usd="0.001")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2000, max_tokens=64)
    started = time.monotonic()
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.report.outcome is RunOutcome.FATAL and ran.exit_code == 4
    assert time.monotonic() - started < 15
    assert "quota" in (ran.message or "")
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] < 2000
    assert ledger_total(db) >= ledger["billed_pico"]


@pytest.mark.parametrize("give_limits", [True, False], ids=["flags", "learned-from-headers"])
async def test_under_server_rate_limits_fewer_than_2_percent_of_requests_meet_a_429(
    tmp_path: Path, make_simulator: SimFactory, give_limits: bool
) -> None:
    rpm, tpm = 600, 57_000
    sim = make_simulator(rpm=rpm, tpm=tpm, latency_ms=10, latency_jitter=0.5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    # ~64 prompt + 16 output tokens: 630 requests need both buckets past their first minute.
    write_job(job, 630, prompt_words=45, max_tokens=16, seed=5)
    limits = Limits(rpm=rpm, tpm=tpm) if give_limits else Limits()
    ran = await run_in_process(job, db, sim.base_url, limits=limits)
    assert ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 630
    assert ledger["rate_limited"] < 0.02 * 630, ledger
