"""The governor: limits from flags and headers, pauses after 429s, the probe gate."""

from __future__ import annotations

import asyncio

import pytest

from runner.clock import VirtualClock
from runner.governor import PROBE_WAIT, Governor, parse_duration

from .virtual import clock, on_virtual_time

__all__ = ["clock"]  # the fixture


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("12ms", 0.012),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("6m0s", 360.0),
        ("1h2m3s", 3723.0),
        ("2m30.5s", 150.5),
        ("-1", None),
        ("", None),
        ("soon", None),
        ("0", 0.0),
    ],
)
def test_go_durations_parse_with_ms_before_m(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@on_virtual_time
async def test_the_governor_learns_limits_from_headers_and_ignores_nonsense(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock, probe=False)
    t = await g.acquire(10)
    g.done(t, {"x-ratelimit-limit-requests": "-1", "x-ratelimit-limit-tokens": "0"})
    assert g.requests is None and g.tokens is None
    t = await g.acquire(10)
    g.done(
        t,
        {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "590",
            "x-ratelimit-limit-tokens": "90000",
            "x-ratelimit-remaining-tokens": "1000",
        },
    )
    assert g.requests is not None and g.requests.limit == 600
    assert g.tokens is not None and g.tokens.limit == 90000
    # the token bucket was drained to what the server said was left
    assert not g.tokens.limiter.has_capacity(2000)
    assert g.tokens.limiter.has_capacity(900)


@on_virtual_time
async def test_a_user_limit_above_the_servers_gives_way_to_the_server(clock: VirtualClock) -> None:
    g = Governor(clock=clock, rpm=10_000, probe=False)
    t = await g.acquire(1)
    g.done(t, {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499"})
    assert g.requests is not None and g.requests.limit == 500


@on_virtual_time
async def test_only_requests_admitted_after_the_answered_one_are_subtracted(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock, rpm=100, probe=False)
    tickets = [await g.acquire(1) for _ in range(11)]
    assert g.requests is not None
    headers = {"x-ratelimit-limit-requests": "100"}
    # The last request is answered first: the server had received all 11 (89 left), so the
    # 10 still in flight were already counted there and must not be subtracted again.
    g.done(tickets[-1], {**headers, "x-ratelimit-remaining-requests": "89"})
    assert g.requests.limiter.has_capacity(89)
    # The first request, answered now, was seen when only it had arrived (99 left); the 9
    # admitted after it and still unanswered may not have arrived yet.
    g.done(tickets[0], {**headers, "x-ratelimit-remaining-requests": "99"})
    assert g.requests.limiter.has_capacity(89)
    # A server with less room than we think (another client shares the account) drains us.
    g.done(tickets[1], {**headers, "x-ratelimit-remaining-requests": "50"})
    assert not g.requests.limiter.has_capacity(50)
    assert g.requests.limiter.has_capacity(42)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e30", "many"])
def test_nonsense_limit_headers_are_ignored_without_raising(value: str) -> None:
    g = Governor(clock=clock, probe=False)
    g.done(0, {"x-ratelimit-limit-requests": value, "x-ratelimit-remaining-requests": value})
    assert g.requests is None


@on_virtual_time
async def test_the_first_request_goes_alone_and_the_rest_wait_for_its_answer(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock)
    probe = await g.acquire(1)
    follower = asyncio.create_task(g.acquire(1))
    await asyncio.sleep(PROBE_WAIT - 0.01)
    assert not follower.done()  # held until the probe has told us the limits
    g.done(probe, {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599"})
    started = clock.monotonic()
    await follower
    # Released by the answer (a few turns of the loop), not by the 10 ms left of the wait.
    assert clock.monotonic() - started < 0.001
    assert g.requests is not None and g.requests.limit == 600


@on_virtual_time
async def test_a_slow_probe_does_not_hold_the_rest_forever(
    monkeypatch: pytest.MonkeyPatch, clock: VirtualClock
) -> None:
    monkeypatch.setattr("runner.governor.PROBE_WAIT", 0.1)  # what the governor reads
    g = Governor(clock=clock)
    await g.acquire(1)
    started = clock.monotonic()
    await g.acquire(1)
    assert clock.monotonic() - started == pytest.approx(0.1, abs=0.002)


@on_virtual_time
async def test_an_exhausted_limit_pauses_everyone_then_releases_at_the_limits_rate(
    clock: VirtualClock,
) -> None:
    g = Governor(
        clock=clock, rpm=600, probe=False
    )  # one request per 0.1 s once the bucket is empty
    t = await g.acquire(1)
    wait = g.rate_limited({"x-ratelimit-remaining-requests": "0"}, 0.2, "requests")
    g.done(t, {}, passed=False)
    assert wait == 0.2 and g.paused_for == pytest.approx(0.2)
    started = clock.monotonic()
    admitted = []
    for _ in range(4):  # after the pause, one probe first, then the rest at the rate
        g.done(await g.acquire(1), {})
        admitted.append(round(clock.monotonic() - started, 3))
    # The pause (0.2 s) emptied the bucket to last until its end, so each request, the probe
    # included, then needs another 0.1 s: none go in a burst at the end of the pause.
    assert admitted == pytest.approx([0.3, 0.4, 0.5, 0.6], abs=0.002)


@on_virtual_time
async def test_a_429_with_headroom_backs_off_only_that_request(clock: VirtualClock) -> None:
    g = Governor(clock=clock, rpm=600, probe=False)
    headers = {"x-ratelimit-remaining-requests": "300", "retry-after-ms": "100"}
    assert g.rate_limited(headers, 0.1, "requests") == 0.1
    assert g.paused_for == 0


@on_virtual_time
async def test_without_retry_after_the_wait_is_the_reset_capped_by_what_the_limit_needs(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock, rpm=60, probe=False)
    # the reset header says when the bucket is *full* again (60 s); one request needs 1 s
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "60s"}
    assert g.rate_limited(headers, None, "requests") == pytest.approx(1.0)
    headers["x-ratelimit-reset-requests"] = "300ms"
    assert g.rate_limited(headers, None, "requests") == pytest.approx(0.3)


def test_a_runner_governs_at_its_share_of_the_organizations_limits() -> None:
    g = Governor(clock=clock, rpm=600, tpm=90_000, probe=False)
    g.set_share(1 / 3)
    assert g.requests is not None and g.requests.limit == 200
    assert g.tokens is not None and g.tokens.limit == 30_000
    assert g.rate() == pytest.approx(200 / 60)


@on_virtual_time
async def test_a_new_share_keeps_what_was_used_and_waiters_wait_at_the_new_rate(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock, rpm=600, probe=False)
    for _ in range(300):  # half the minute's capacity used
        await g.acquire(1)
    assert g.requests is not None
    g.set_share(1 / 3)  # two more runners joined: 200/min, still half used
    assert g.requests.limit == 200
    assert g.requests.limiter.has_capacity(99) and not g.requests.limiter.has_capacity(102)
    g.set_share(1.0)  # they left: 600/min, still half used (no burst)
    assert g.requests.limiter.has_capacity(299) and not g.requests.limiter.has_capacity(302)


@on_virtual_time
async def test_sharing_runners_count_on_their_share_of_what_the_headers_say_is_left(
    clock: VirtualClock,
) -> None:
    g = Governor(clock=clock, rpm=600, probe=False)
    g.set_share(1 / 3)
    tickets = [await g.acquire(1) for _ in range(3)]
    assert g.requests is not None
    headers = {"x-ratelimit-limit-requests": "600"}
    # 300 left for three runners: this one counts on a third, less what the two others may
    # have on their way (as many as this one has unanswered, 2, and a margin of 2 each), less
    # its own request sent after the answered one.
    g.done(tickets[1], {**headers, "x-ratelimit-remaining-requests": "300"})
    assert g.requests.limiter.has_capacity(96) and not g.requests.limiter.has_capacity(97)
    # An older answer tells of more room than there is now: ignored.
    g.done(tickets[0], {**headers, "x-ratelimit-remaining-requests": "500"})
    assert not g.requests.limiter.has_capacity(97)
    # A newer one with less room left lowers it: (30 - 2 x 2) / 3.
    g.done(tickets[2], {**headers, "x-ratelimit-remaining-requests": "30"})
    assert g.requests.limiter.has_capacity(8) and not g.requests.limiter.has_capacity(9)
