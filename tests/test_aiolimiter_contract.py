"""The contract between runner/governor.py and aiolimiter's private state.

aiolimiter has no public way to set how full a bucket is or to change its rate in place, so the
governor's ``_limiter_level``, ``_set_limiter_level``, ``_rescale_limiter_level`` and
``_set_limiter_rate`` reach into an ``AsyncLimiter``. These tests check, against the installed
aiolimiter, that every private attribute they use exists and behaves as they assume; a new
aiolimiter that breaks one fails here rather than as a governor that lets a burst through.

aiolimiter reads time from the event loop (``loop.time()``); the ``clock`` fixture freezes that
clock and moves it only when a test says so, so nothing here depends on how busy the machine is.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
from collections.abc import Iterator

import pytest
from aiolimiter import AsyncLimiter

from runner import governor
from runner.governor import (
    LIMITER_PRIVATE_ATTRS,
    _limiter_level,
    _rescale_limiter_level,
    _set_limiter_level,
    _set_limiter_rate,
)

# What the tests below cover: every private attribute the governor touches, and _last_check,
# which it relies on through has_capacity() (the leak counts from there).
COVERED = {"_level", "_rate_per_sec", "_waiters", "_wake_next", "_last_check"}


class Clock:
    """The event loop's clock, frozen at ``now`` until a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self, _loop: object = None) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(asyncio.BaseEventLoop, "time", lambda loop: c.now)
    yield c


async def settle() -> None:
    """Let every callback and task that is due run (timers due by the frozen clock included)."""
    for _ in range(10):
        await asyncio.sleep(0)


def _private_attributes_governor_uses() -> set[str]:
    """Every ``x._name`` in governor.py where ``x`` is not ``self``: the limiter's privates."""
    tree = ast.parse(inspect.getsource(governor))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    }


def test_the_installed_aiolimiter_is_the_pinned_series() -> None:
    assert importlib.metadata.version("aiolimiter").split(".")[:2] == ["1", "3"]


def test_every_private_attribute_governor_uses_is_listed_and_covered_here() -> None:
    used = _private_attributes_governor_uses()
    assert used == set(LIMITER_PRIVATE_ATTRS)  # all of it goes through the listed few
    assert used <= COVERED


def test_the_private_attributes_exist_on_asynclimiter() -> None:
    for name in ("_level", "_rate_per_sec", "_waiters", "_last_check"):
        assert name in AsyncLimiter.__slots__, name
    assert callable(AsyncLimiter._wake_next)
    lim = AsyncLimiter(120, 60)
    assert lim._level == 0.0 and isinstance(lim._level, float)
    assert lim._rate_per_sec == 2.0  # max_rate / time_period, cached
    assert lim._waiters == []


async def test_the_level_is_the_capacity_in_use_as_has_capacity_sees_it(clock: Clock) -> None:
    lim = AsyncLimiter(100, 60)
    assert _limiter_level(lim) == 0.0
    await lim.acquire(30)  # acquiring raises the level by the amount
    assert _limiter_level(lim) == 30.0
    _set_limiter_level(lim, 70.0)  # setting it lowers the free capacity at once
    assert lim.has_capacity(30) and not lim.has_capacity(31)
    _set_limiter_level(lim, 0.0)
    assert lim.has_capacity(100)


async def test_a_level_above_the_capacity_holds_requests_back_until_it_leaks(
    clock: Clock,
) -> None:
    lim = AsyncLimiter(60, 60)  # leaks 1 per second
    _limiter_level(lim)
    _set_limiter_level(lim, 65.0)  # what Bucket.empty does for a pause
    assert not lim.has_capacity(0)
    clock.now += 5.9
    assert not lim.has_capacity(1)
    clock.now += 0.2  # 6.1 s: 59 in use
    assert lim.has_capacity(1) and not lim.has_capacity(2)


async def test_the_level_leaks_with_the_loops_time_from_the_last_check(clock: Clock) -> None:
    lim = AsyncLimiter(120, 60)  # leaks 2 per second
    _limiter_level(lim)
    assert lim._last_check == clock.now  # has_capacity() records when it leaked
    _set_limiter_level(lim, 50.0)
    clock.now += 5.0
    assert _limiter_level(lim) == pytest.approx(40.0)
    assert lim._last_check == clock.now
    clock.now += 1000.0
    assert _limiter_level(lim) == 0.0  # never below empty


async def test_a_level_set_right_after_reading_it_counts_from_then(clock: Clock) -> None:
    # An empty bucket idle for long: its _last_check is old. Reading the level (a leak) moves
    # it to now, so what governor sets next does not leak away the idle time at once.
    lim = AsyncLimiter(120, 60)
    _limiter_level(lim)
    clock.now += 1000.0
    assert _limiter_level(lim) == 0.0
    _set_limiter_level(lim, 50.0)
    assert _limiter_level(lim) == 50.0
    clock.now += 1.0
    assert _limiter_level(lim) == pytest.approx(48.0)


def test_rescaling_an_empty_bucket_needs_no_event_loop() -> None:
    lim = AsyncLimiter(100, 60)
    _rescale_limiter_level(lim, 50, 100)  # Governor.set_share may run before any loop does
    _set_limiter_rate(lim, 50)
    assert lim._level == 0.0 and lim.max_rate == 50


async def test_rescaling_keeps_the_share_of_the_bucket_in_use(clock: Clock) -> None:
    lim = AsyncLimiter(120, 60)
    _limiter_level(lim)
    _set_limiter_level(lim, 60.0)
    clock.now += 6.0  # 12 leaked: 48 in use
    _rescale_limiter_level(lim, 60, 120)
    assert lim._level == pytest.approx(24.0)


async def test_a_new_rate_sets_the_capacity_and_the_leak(clock: Clock) -> None:
    lim = AsyncLimiter(100, 60)
    _limiter_level(lim)
    _set_limiter_rate(lim, 50)
    assert lim.max_rate == 50 and lim._rate_per_sec == pytest.approx(50 / 60)
    assert lim.has_capacity(50) and not lim.has_capacity(51)
    _set_limiter_level(lim, 50.0)
    clock.now += 6.0  # 5 leaked at the new rate (10 at the old)
    assert _limiter_level(lim) == pytest.approx(45.0)
    _set_limiter_rate(lim, 200)
    assert lim.has_capacity(155) and not lim.has_capacity(156)


async def test_waiters_are_a_heap_of_amount_order_future(clock: Clock) -> None:
    lim = AsyncLimiter(100, 60)
    await lim.acquire(100)
    first = asyncio.create_task(lim.acquire(80))
    second = asyncio.create_task(lim.acquire(10))
    await settle()
    assert not first.done() and not second.done()
    assert len(lim._waiters) == 2
    for amount, order, future in lim._waiters:
        assert isinstance(amount, int | float) and isinstance(order, int)
        assert isinstance(future, asyncio.Future)
        assert not future.done()
    assert sorted((a, n) for a, n, _ in lim._waiters) == [(10.0, 1), (80.0, 0)]
    assert lim._waiters[0][0] == 10  # a min-heap on the amount
    first.cancel()
    second.cancel()
    await settle()


async def test_waiters_wait_at_the_new_rate(clock: Clock) -> None:
    lim = AsyncLimiter(100, 60)
    await lim.acquire(100)
    waiter = asyncio.create_task(lim.acquire(40))  # at 100/min: waits 24 s (level <= 60)
    await settle()
    # Halve the rate the way Bucket.rescale does: level 50 of 50; the 40 fits at level 10,
    # 48 s from now at 50/min.
    _rescale_limiter_level(lim, 50, 100)
    _set_limiter_rate(lim, 50)
    clock.now += 47.0  # long past the old rate's 24 s
    await settle()
    assert not waiter.done()
    clock.now += 1.5
    await settle()
    assert waiter.done()
    await waiter


async def test_a_waiter_larger_than_a_shrunk_capacity_asks_again_and_is_admitted(
    clock: Clock,
) -> None:
    # aiolimiter's acquire() re-checks the amount it was called with, so a waiter larger than
    # a shrunk capacity would never fit: _set_limiter_rate wakes it with an error, and the
    # governor's bucket asks again for what fits now.
    bucket = governor._Bucket(100, learned=True, share=1.0)
    await bucket.acquire(100)
    waiter = asyncio.create_task(bucket.acquire(80))
    await settle()
    bucket.rescale(0.5)  # another runner joined: 50 of the 100
    await settle()
    assert not waiter.done()  # the bucket is still full
    clock.now += 61.0  # long enough for 50 to leak at 50/min
    await settle()
    assert waiter.done() and waiter.exception() is None
    assert _limiter_level(bucket.limiter) == pytest.approx(50.0)


async def test_wake_next_releases_a_waiter_that_fits_after_a_rate_change(clock: Clock) -> None:
    lim = AsyncLimiter(100, 60)
    await lim.acquire(100)
    waiter = asyncio.create_task(lim.acquire(100))  # at 100/min: waits 60 s
    await settle()
    assert not waiter.done()
    _set_limiter_rate(lim, 200)  # room for 100 more now; _wake_next must notice at once
    await settle()  # the clock has not moved
    assert waiter.done()
    await waiter
    assert _limiter_level(lim) == 200.0
