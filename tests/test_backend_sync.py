"""The synchronous worker pool's own bookkeeping (its behaviour under load is in test_engine)."""

from __future__ import annotations

import pytest

from runner.backends import sync
from runner.clock import VirtualClock
from runner.governor import Governor

from .virtual import clock, on_virtual_time

__all__ = ["clock"]  # the fixture


def test_the_pool_remembers_only_the_last_seconds_of_completions(clock: VirtualClock) -> None:
    """With a known rate nothing asks for the observed throughput, yet a run of millions of
    requests must not keep a timestamp for each of them."""
    pool = sync._Pool(8, 64, clock)
    for _ in range(100_000):  # 1,000 completions a second for 100 s
        clock.advance(0.001)
        pool.observe(0.05)
    assert len(pool._finished) <= 1000 * sync._THROUGHPUT_WINDOW + 1
    assert pool.throughput() == pytest.approx(1000, rel=0.01)


def _pool(clock: VirtualClock, latency: float = 0.15, ceiling: int = 512) -> sync._Pool:
    pool = sync._Pool(32, ceiling, clock)
    pool.observe(latency)
    return pool


def test_the_pool_adds_what_the_limit_allows_now_to_what_its_rate_keeps_in_flight(
    clock: VirtualClock,
) -> None:
    """3,000 RPM (50/s) at 150 ms: the steady rate keeps ceil(50 x 0.15 x 1.25) + 2 = 12 in
    flight; a limit that starts full lets 3,000 go at once, so the pool opens to --concurrency
    and comes down to the steady size as the bucket drains."""
    pool = _pool(clock)
    assert pool.want(50.0, 3000.0) == 512  # a full bucket: as many as --concurrency allows
    assert pool.want(50.0, 200.0) == 12 + 200  # draining: the steady part plus what is left
    assert pool.want(50.0, 0.4) == 13  # a fraction of a request still counts as one
    assert pool.want(50.0, 0.0) == 12  # drained: the steady size
    assert pool.want(50.0, None) == 12  # nothing known about the buckets
    assert pool.want(2.0, 0.0) == sync._MIN_POOL  # never below the floor
    assert _pool(clock, ceiling=100).want(50.0, 3000.0) == 100


@on_virtual_time
async def test_resizing_follows_the_bucket_up_and_down(clock: VirtualClock) -> None:
    pool = _pool(clock)
    await pool.resize(50.0, 2999.0)
    assert pool.size == 512
    await pool.resize(50.0, 100.0)
    assert pool.size == 112
    await pool.resize(50.0, 0.0)
    assert pool.size == 12


def _answer(g: Governor, ticket: int, remaining: int, limit: int = 3000) -> None:
    g.done(
        ticket,
        {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(remaining),
        },
    )


@on_virtual_time
async def test_headroom_is_what_the_buckets_hold_free_once_the_probe_has_answered(
    clock: VirtualClock,
) -> None:
    g = Governor(rpm=3000, clock=clock)
    probe = await g.acquire(57)
    assert g.headroom() == 0  # the probe is out: the limit may be used up, nobody knows yet
    _answer(g, probe, remaining=2999)
    assert g.headroom() == pytest.approx(2999)
    tickets = [await g.acquire(57) for _ in range(500)]
    assert g.headroom() == pytest.approx(2499)
    # Another client spent most of the limit: the headers drain the bucket, and the pool with it.
    _answer(g, tickets[-1], remaining=100)
    assert g.headroom() == pytest.approx(100)
    pool = _pool(clock)
    await pool.resize(g.rate(), g.headroom())
    assert pool.size == 12 + 100


@on_virtual_time
async def test_an_exhausted_start_leaves_no_headroom(clock: VirtualClock) -> None:
    """The limit was used up before the run (the case the adaptive pool was made for): the
    probe's answer says 0 left, everything pauses, and the pool stays at the steady size."""
    g = Governor(rpm=120, clock=clock)
    probe = await g.acquire(20)
    g.done(
        probe,
        {"x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "0"},
        passed=False,
    )
    g.rate_limited({"x-ratelimit-remaining-requests": "0"}, 1.0, "requests")
    assert g.paused_for > 0
    assert g.headroom() == 0
    pool = _pool(clock, latency=0.15)
    await pool.resize(g.rate(), g.headroom())
    assert pool.size == sync._MIN_POOL


@on_virtual_time
async def test_a_shared_runner_counts_only_its_share_and_tokens_bind_by_weight(
    clock: VirtualClock,
) -> None:
    g = Governor(rpm=3000, tpm=100_000, probe=False, clock=clock)
    assert g.headroom() == pytest.approx(3000)  # no weight seen yet: the requests bucket
    g.set_share(0.25)  # four runners on the job: 750 of the 3,000 are this one's
    assert g.headroom() == pytest.approx(750)
    await g.acquire(1000)  # requests of ~1,000 tokens: 25,000 TPM is 25 of them at once
    assert g.headroom() == pytest.approx((25_000 - 1000) / 1000)
    assert (
        Governor(probe=False, clock=clock).headroom() is None
    )  # no limit known: the throughput decides


def test_an_outage_waits_double_per_failed_probe_not_per_failed_request(
    clock: VirtualClock,
) -> None:
    outage = sync._Outage(clock)
    first = outage.failed()
    assert first == sync._OUTAGE_FIRST_WAIT
    clock.advance(first / 2)
    # The other requests that were in flight fail too: they wait out the same probe's wait.
    assert outage.failed() == pytest.approx(first / 2)
    clock.advance(first / 2)
    assert outage.failed() == 2 * first  # the probe failed: twice as long
    waits = []
    for _ in range(20):
        clock.advance(outage.wait)
        waits.append(outage.failed())
    assert max(waits) == sync._OUTAGE_MAX_WAIT and waits[-1] == sync._OUTAGE_MAX_WAIT
    assert outage.seconds == pytest.approx(clock.monotonic() - 1000.0)
    outage.reached()
    assert outage.seconds == 0.0
