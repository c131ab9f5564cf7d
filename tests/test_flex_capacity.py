"""Flex processing's capacity 429s (``resource_unavailable``) are capacity, not rate limits
(issue 19, point 3, in part): nothing pauses, no attempt is used up, nothing is billed, and the
request is asked again after a growing backoff."""

from __future__ import annotations

import json
from pathlib import Path

from runner.settings import Limits, Retry

from .helpers import query, run_in_process


def _flex_job(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            body = {
                "model": "gpt-4o-mini", "service_tier": "flex", "max_completion_tokens": 16,
                "messages": [{"role": "user", "content": f"flex request {i}"}],
            }  # fmt: skip
            line = {"custom_id": f"f{i}", "method": "POST", "url": "/v1/chat/completions"}
            f.write(json.dumps({**line, "body": body}) + "\n")


async def test_capacity_429s_are_retried_without_a_pause_or_an_attempt_and_never_billed(
    tmp_path: Path, make_simulator
) -> None:
    sim = make_simulator(flex_p_unavailable=0.5, rpm=6000)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    _flex_job(job, 40)
    ran = await run_in_process(
        job, db, sim.base_url, cap="1", limits=Limits(rpm=6000),
        # One attempt each: a capacity 429 that used one up would fail the request.
        retry=Retry(max_attempts=1, backoff_base=0.01, backoff_max=0.05),
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 40}
    ledger = sim.ledger_snapshot()
    assert ledger["flex_unavailable"] > 0  # the server did say no, often
    assert ledger["requests_billed"] == 40 and ledger["duplicate_bodies"] == 0
    assert ran.status.spend.settled_pico == ledger["billed_pico"]
    stats = ran.report.stats
    assert stats is not None
    assert stats.capacity_waits == ledger["flex_unavailable"] and stats.rate_limited == 0
    paused = query(db, "SELECT COUNT(*) FROM events WHERE kind = 'rate_limit_pause'")[0][0]
    assert paused == 0


async def test_a_flex_request_may_take_the_flex_timeout_not_the_standard_one(
    tmp_path: Path, make_simulator
) -> None:
    """Flex answers are slower by design: a flex request waits up to the flex timeout (the
    guide's 15 minutes by default), where a standard one would have timed out and been resent."""
    sim = make_simulator(flex_latency_ms=600, rpm=6000)
    job, db = tmp_path / "job.jsonl", tmp_path / "b.db"
    _flex_job(job, 6)
    ran = await run_in_process(
        job, db, sim.base_url, cap="1", limits=Limits(rpm=6000),
        retry=Retry(max_attempts=1), timeout=0.2, flex_timeout=10.0,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.message
    assert ran.status.states == {"done": 6}
    assert sim.ledger_snapshot()["requests_billed"] == 6
    timeouts = query(db, "SELECT COUNT(*) FROM attempts WHERE error_kind = 'timeout'")[0][0]
    assert timeouts == 0
