"""The engine against a server that misbehaves: exhausted rate limits, outages, wrong URLs and
keys, slow bodies, missing or nonsense usage, responses that cost more than they may, and a
LiteLLM-style proxy. Each keeps going where the API will recover, stops with a clear outcome
where it will not, and never loses a row, re-buys a result or books less than was billed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from runner.engine import RunOutcome
from runner.export import export_lines
from runner.money import usd_to_pico
from runner.settings import Limits, Retry
from runner.simulator import SimulatorThread
from runner.store import open_store

from .books import (
    assert_consistent,
    assert_covers_bill,
    books,
    rows,
    scalar,
    wait_quiet,
    watch_bills,
)
from .helpers import batchrun, ledger_total, query, result_costs, run_in_process, write_job

SimFactory = Callable[..., SimulatorThread]
FAST = Retry(max_attempts=20, backoff_base=0.005, backoff_max=0.05)


async def spend_the_limit(sim: SimulatorThread, n: int) -> None:
    """Send ``n`` requests from another client on the same key (another job, say)."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1}  # fmt: skip
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            data = dict(body, messages=[{"role": "user", "content": f"other job {i}"}])
            async with session.post(f"{sim.base_url}/chat/completions", json=data) as r:
                await r.read()

        await asyncio.gather(*(one(i) for i in range(n)))


# -- 1. an exhausted rate limit at start ----------------------------------------------------------


async def test_a_run_on_an_exhausted_limit_is_governed_not_failed(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(rpm=600)
    await spend_the_limit(sim, 600)  # the key's minute is used up before the run starts
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=1)
    before = sim.ledger_snapshot()["rate_limited"]
    # One attempt per request: any rate-limit 429 counted against it would fail the row.
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(max_attempts=1))
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 30}
    # The first 429 pauses everyone; after it requests go at the limit's rate, not in a herd.
    assert sim.ledger_snapshot()["rate_limited"] - before <= 3


# -- 2. outages -----------------------------------------------------------------------------------


async def test_an_outage_mid_run_costs_nothing_for_requests_that_never_connected(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(latency_ms=20)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 300, seed=2)

    async def restart_the_server() -> None:
        while sim.ledger_snapshot()["requests_received"] < 60:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(sim.outage, 1.5)

    outage = asyncio.create_task(restart_the_server())
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(max_attempts=2))
    await outage
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 300}
    refused = query(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = 'connect'")[0][0]
    dropped = query(
        db, "SELECT COUNT(*) FROM attempts WHERE error_kind IN ('connection', 'timeout')"
    )[0][0]
    unknown = query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0]
    assert refused > 0
    assert unknown == dropped  # only requests that may have arrived are charged
    wait_quiet(sim)
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


async def test_an_outage_past_the_limit_stops_with_exit_5_and_rows_pending(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 50, seed=3)
    sim.outage(30)
    started = time.monotonic()
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(outage_limit=1.0, max_attempts=1))
    assert ran.report.outcome is RunOutcome.UNREACHABLE and ran.exit_code == 5
    assert "unreachable" in (ran.message or "")
    assert time.monotonic() - started < 15
    assert ran.status.states == {"pending": 50}
    assert ledger_total(db) == 0


async def test_a_wrong_base_url_stops_as_a_usage_error_and_fails_no_row(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator()
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 100, seed=4)
    ran = await run_in_process(job, db, sim.base_url.removesuffix("/v1") + "/v2")
    assert ran.report.outcome is RunOutcome.REFUSED and ran.exit_code == 2
    assert "404" in (ran.message or "") and "base URL" in (ran.message or "")
    assert ran.status.states.get("failed", 0) == 0
    assert ran.status.states == {"pending": 100}


async def test_a_slow_body_is_bounded_by_the_timeout(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_slowloris=1.0)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2, seed=5)
    started = time.monotonic()
    ran = await run_in_process(
        job, db, sim.base_url, timeout=0.5, retry=Retry(max_attempts=2, backoff_base=0.01)
    )
    assert time.monotonic() - started < 6  # two half-second attempts each, not minutes
    assert ran.exit_code == 1 and ran.status.states == {"failed": 2}
    assert "timed out" in query(db, "SELECT error_message FROM results LIMIT 1")[0][0]
    # every timed-out attempt may have been billed: each is charged at worst case
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0] == 4


async def test_an_absurd_retry_after_is_cut_to_max_wait_and_said(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_429=0.3, retry_after="99999999", retry_after_ms="inf", seed=6)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=6)
    started = time.monotonic()
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(max_wait=0.2))
    assert ran.exit_code == 0, ran.message
    assert time.monotonic() - started < 20
    notices = ran.report.stats.notices
    assert any("99,999,999s" in n and "0s (the longest wait allowed)" in n for n in notices)


# Each fault on 60% of requests, up to 3 attempts a request: most rows succeed after retries,
# about a fifth fail after their third attempt; the run goes on either way.
NETWORK_FAULTS = {
    "closed-mid-response": ({"p_reset_after_bill": 0.6}, "connection", "connection lost"),
    "closed-before-response": ({"p_reset": 0.6}, "connection", "connection lost"),
    "hangs-past-timeout": ({"p_slow": 0.6, "slow_s": 6.0}, "timeout", "timed out"),
    "invalid-json": ({"p_invalid_json": 0.6}, "invalid_response", "unreadable body"),
    "html-error-page": ({"p_html": 0.6}, "server", "HTTP 502"),
}


@pytest.mark.parametrize("fault", list(NETWORK_FAULTS))
async def test_network_faults_are_retried_or_failed_cleanly_and_the_run_goes_on(
    tmp_path: Path, make_simulator: SimFactory, fault: str
) -> None:
    config, kind, message = NETWORK_FAULTS[fault]
    sim = make_simulator(seed=11, **config)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, seed=9)
    ran = await run_in_process(
        job,
        db,
        sim.base_url,
        timeout=2.0,  # a busy machine's answers are not timeouts; a hang is 6 s
        limits=Limits(concurrency=40),
        # Each row's own retries are the point here, not a misconfigured server: the first
        # answers are never taken as "this is not the API" (their arrival order varies).
        retry=Retry(max_attempts=3, backoff_base=0.01, backoff_max=0.05, same_error_limit=0),
    )
    assert ran.exit_code == 1, ran.message
    b = books(db)
    assert b.done > 0 and b.failed > 0 and b.done + b.failed == 40  # every row finished
    assert scalar(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = ?", kind) > 0
    failures = rows(db, "SELECT error_message FROM results WHERE error_message IS NOT NULL")
    assert len(failures) == b.failed
    assert all(m.startswith("gave up after 3 attempts: ") and message in m for (m,) in failures)
    store = open_store(db, readonly=True)
    try:
        exported = [json.loads(line) for line in export_lines(ran.status.job, store.iter_export(1))]
    finally:
        store.close()
    assert len(exported) == 40  # every line valid JSON
    wait_quiet(sim)
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


# -- 3. failed rows are not final -----------------------------------------------------------------


async def test_failed_rows_can_be_queued_again_by_error_code(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_500=1.0)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 20, seed=7)
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(max_attempts=1))
    assert ran.exit_code == 1 and ran.status.states == {"failed": 20}
    sim.configure(p_500=0.0)
    again = await run_in_process(job, db, sim.base_url, retry_failed=frozenset({"429"}))
    assert again.status.states == {"failed": 20}  # no 429 failures: nothing queued
    again = await run_in_process(job, db, sim.base_url, retry_failed=frozenset({"500"}))
    assert again.exit_code == 0, again.message
    assert again.status.states == {"done": 20}
    assert "20 failed request(s) (500) queued again" in again.output
    assert result_costs(db) == sim.ledger_snapshot()["billed_pico"]


async def test_after_failures_status_names_the_commands_that_list_and_resend_them(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    from runner.report import format_status

    sim = make_simulator(p_500=1.0)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 12, seed=3)
    ran = await run_in_process(job, db, sim.base_url, retry=Retry(max_attempts=1))
    text = format_status(ran.status)
    hint = "12 request(s) failed for good: `batchrun status --job 1 --failed` lists them; "
    assert hint + "`batchrun run --job 1 --retry-failed` sends them again" in text
    listed = batchrun("status", "--job", "1", "--failed", "--db", db)
    assert listed.returncode == 0 and "job 1: 12 failed request(s)" in listed.stdout
    sim.configure(p_500=0.0)
    again = batchrun("run", "--job", "1", "--retry-failed", "--db", db, "--base-url", sim.base_url)
    assert again.returncode == 0, again.stderr
    assert "failed for good" not in again.stdout


# -- 4. books that never fall below the bill ------------------------------------------------------


async def test_a_result_without_readable_usage_is_kept_and_charged_at_worst_case(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_no_usage=0.2, p_empty_usage=0.2, p_bad_usage=0.2, seed=8)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 100, seed=8)
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.exit_code == 0, ran.message
    ledger = sim.ledger_snapshot()
    assert ledger["requests_billed"] == 100 and ledger["duplicate_bodies"] == 0  # not re-bought
    flagged = query(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%usage_missing%'")[0][0]
    assert 40 <= flagged <= 80 and ran.status.usage_missing == flagged
    assert ledger_total(db) >= ledger["billed_pico"]
    assert_covers_bill(db, sim, bills)


async def test_odd_error_bodies_and_headers_never_lose_a_record(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_code_object=0.2, p_inf_header=0.3, seed=9)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 200, seed=9)
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.exit_code == 1
    states = ran.status.states
    assert states["done"] + states["failed"] == 200 and states["failed"] > 10
    codes = {r[0] for r in query(db, "SELECT error_code FROM results WHERE error_code IS NOT NULL")}
    assert codes == {'{"detail": "bad"}'}
    assert result_costs(db) == sim.ledger_snapshot()["billed_pico"]  # every billed result kept
    assert_covers_bill(db, sim, bills)


async def test_a_quota_refusal_seen_by_many_workers_at_once_is_an_orderly_stop(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(quota_usd="0.0005", latency_ms=30)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 2000, seed=10)
    ran = await run_in_process(job, db, sim.base_url)
    assert ran.report.outcome is RunOutcome.FATAL
    wait_quiet(sim)
    # Every billed response that came back was recorded; nothing was abandoned at worst case.
    assert result_costs(db) == sim.ledger_snapshot()["billed_pico"]
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0] == 0
    assert_consistent(db)
    assert_covers_bill(db, sim, bills)


# -- 5. the cap when a response costs more than its reservation ----------------------------------


async def test_a_server_billing_past_the_output_limits_is_calibrated_for_and_the_cap_holds(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    # Up to 4x the output limit: within what calibration takes (test_calibration has 200x).
    sim = make_simulator(usage_ignores_limits=True, latency_ms=5)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 500, max_tokens=8, seed=11)
    ran = await run_in_process(job, db, sim.base_url, cap="0.005", limits=Limits(concurrency=4))
    assert ran.report.outcome is RunOutcome.CAPPED and ran.exit_code == 3, ran.message
    assert ran.report.stats.overruns >= 1
    over = query(db, "SELECT COUNT(*) FROM results WHERE flags LIKE '%over_reservation%'")[0][0]
    assert over >= 1
    billed = sim.ledger_snapshot()["billed_pico"]
    assert ledger_total(db) >= billed and billed <= usd_to_pico("0.005")
    assert ran.status.calibration["gpt-4o-mini"].output_ppm > 3_000_000
    assert any("reserved at" in n for n in ran.report.stats.notices)


def _conversation_job(path: Path, n: int) -> None:
    lines = []
    for i in range(n):
        body = {"model": "gpt-4.1-mini", "input": f"and then {i}?", "max_output_tokens": 8,
                "previous_response_id": f"resp_{i}"}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                 "url": "/v1/responses", "body": body}))  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


async def test_unbounded_requests_are_refused_unless_allowed_then_the_cap_still_stops_them(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    import pytest

    from runner.errors import UsageError

    sim = make_simulator(conversation_tokens=20_000)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    _conversation_job(job, 40)
    with pytest.raises(UsageError, match="allow unbounded requests"):
        await run_in_process(job, db, sim.base_url)
    assert sim.ledger_snapshot()["requests_received"] == 0
    ran = await run_in_process(
        job, db, sim.base_url, cap="0.05", allow_unbounded=True, limits=Limits(concurrency=2)
    )
    assert ran.exit_code == 3, ran.message
    billed = sim.ledger_snapshot()["billed_pico"]
    assert ran.status.states.get("pending", 0) > 0  # stopped once spend reached the cap
    assert billed <= 0.05 * 10**12 + 3 * 20_000 * 400_000  # at most the last few in flight over


# -- 9. behind an OpenAI-compatible proxy ---------------------------------------------------------


async def test_behind_a_proxy_that_holds_requests_the_first_burst_waits_for_a_probe(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(proxy=True, rpm=600)
    await spend_the_limit(sim, 590)  # ten left this minute
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 30, seed=12)
    ran = await run_in_process(job, db, sim.base_url, timeout=2.0)
    assert ran.exit_code == 0, ran.message
    # No request was held past the timeout: nothing charged as an unknown outcome.
    assert query(db, "SELECT COUNT(*) FROM ledger WHERE kind = 'unknown'")[0][0] == 0
    assert result_costs(db) == ledger_total(db)


async def test_a_proxys_400_for_a_wrong_key_stops_without_failing_rows(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(proxy=True, api_key="sk-the-right-key-000000000000")
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, seed=13)
    ran = await run_in_process(job, db, sim.base_url, key="sk-wrong-key-111111111111")
    assert ran.report.outcome is RunOutcome.REFUSED and ran.exit_code == 2
    assert "no_db_connection" in (ran.message or "")
    assert ran.status.states == {"pending": 40}


async def test_a_response_that_does_not_answer_its_request_is_not_a_result(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    sim = make_simulator(p_short_embeddings=0.3, seed=14)
    bills = watch_bills(sim)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    lines = []
    for i in range(30):
        body = {"model": "text-embedding-3-small", "input": [f"a {i}", f"b {i}", f"c {i}"],
                "encoding_format": "float"}  # fmt: skip
        lines.append(json.dumps({"custom_id": f"e{i}", "method": "POST",
                                 "url": "/v1/embeddings", "body": body}))  # fmt: skip
    job.write_text("\n".join(lines) + "\n")
    ran = await run_in_process(job, db, sim.base_url, retry=FAST)
    assert ran.exit_code == 0, ran.message
    for (body,) in query(db, "SELECT body FROM results"):
        assert len(json.loads(body)["data"]) == 3
    assert query(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = 'invalid_response'")[0][0]
    assert_covers_bill(db, sim, bills)


async def test_a_key_reflected_by_the_server_is_never_stored(
    tmp_path: Path, make_simulator: SimFactory
) -> None:
    key = "sk-REFLECTED-abcdefghijklmnop0123456789"
    sim = make_simulator(echo_key=True, p_500=0.2, seed=15)
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 40, seed=15)
    ran = await run_in_process(job, db, sim.base_url, key=key, retry=Retry(max_attempts=1))
    assert ran.status.states.get("done", 0) > 0
    for path in db.parent.iterdir():
        assert key.encode() not in path.read_bytes(), path
    assert key not in ran.output + (ran.message or "")


async def test_usage_counts_no_real_response_has_are_booked_at_worst_case(tmp_path: Path) -> None:
    from .faultserver import fault_server

    reply = {"choices": [{"message": {"content": "x"}}],
             "usage": {"prompt_tokens": 10**30, "completion_tokens": 10**30}}  # fmt: skip
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 5, seed=16)
    async with fault_server(reply) as base_url:
        ran = await run_in_process(job, db, base_url)
    assert ran.exit_code == 0, ran.message
    worst = query(db, "SELECT SUM(worst_pico) FROM requests")[0][0]
    assert ledger_total(db) == worst and ran.status.usage_missing == 5


async def test_a_name_that_does_not_resolve_is_an_outage_not_a_charge(tmp_path: Path) -> None:
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 10, seed=17)
    ran = await run_in_process(
        job, db, "http://batchrun-test.invalid/v1", retry=Retry(outage_limit=1.0)
    )
    assert ran.report.outcome is RunOutcome.UNREACHABLE and ran.exit_code == 5
    assert ran.status.states == {"pending": 10} and ledger_total(db) == 0


async def test_a_tls_handshake_that_fails_is_an_outage_not_a_charge(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """https:// to a server that speaks plain HTTP: no connection is ever established, so
    nothing was sent and nothing is charged."""
    job, db = tmp_path / "job.jsonl", tmp_path / "run.db"
    write_job(job, 10, seed=18)
    url = simulator.base_url.replace("http://", "https://")
    ran = await run_in_process(job, db, url, retry=Retry(outage_limit=1.0))
    assert ran.report.outcome is RunOutcome.UNREACHABLE and ran.exit_code == 5
    assert ran.status.states == {"pending": 10} and ledger_total(db) == 0
    assert simulator.ledger_snapshot()["billed_pico"] == 0
