"""One clock for a run: where the engine, the governor, the backends, heartbeats and the
budgets' periods read the time and wait.

``Clock`` is real time. Its ``monotonic`` is the event loop's own clock (asyncio's
``loop.time()`` is ``time.monotonic()``), the one aiolimiter's buckets leak by, so the
governor's arithmetic and its buckets agree. ``now`` is epoch seconds, for what is recorded and
for budget periods.

``VirtualClock`` is fake time for tests. It runs a coroutine on an event loop of its own whose
time is the clock's: whenever the loop has nothing to do but wait for a timer, the clock jumps
to that timer instead of sleeping, so a test of a minute of backoff, heartbeats or a rate limit
takes milliseconds and never depends on the machine's speed. I/O and threads still take the
real time they take (the loop looks for them for a moment before each jump), so a test that
waits on a database thread works; one that waits on a network timeout would see it jump.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Clock:
    """Real time."""

    def now(self) -> float:
        """Epoch seconds."""
        return time.time()

    def monotonic(self) -> float:
        """Seconds for intervals; the running event loop's ``time()``."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM = Clock()

# How long (real seconds) the virtual loop looks for I/O and thread results before it jumps
# to the next timer.
_LOOK = 0.002


class VirtualClock(Clock):
    """Fake time that moves only when the loop it runs would otherwise wait for a timer.

    ``run(coro)`` runs ``coro`` to completion on a new event loop driven by this clock; inside
    it ``asyncio.sleep``, ``loop.call_later``, ``asyncio.timeout`` and aiolimiter all go by
    virtual time, and so does everything that reads this clock.
    """

    def __init__(self, start: float = 1_000.0, epoch: float = 1_700_000_000.0) -> None:
        self._t = start  # monotonic seconds
        self._epoch = epoch - start  # now() - monotonic()

    def now(self) -> float:
        return self._epoch + self._t

    def monotonic(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        """Move the clock on (from outside a run; inside one, sleep instead)."""
        self._t += max(0.0, seconds)

    def set_now(self, epoch: float) -> None:
        """Make ``now()`` read ``epoch`` from here on (a test's move across midnight)."""
        self._epoch = epoch - self._t

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _VirtualLoop(self)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on a virtual-time event loop and return its result."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(coro)


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that, asked to wait ``timeout`` for I/O, looks for a moment and then, with
    nothing to report, moves the virtual clock on by ``timeout`` (to the next timer)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer at all: only I/O or a thread can wake the loop
            return super().select(None)
        events = super().select(min(timeout, _LOOK) if timeout > 0 else 0)
        if not events and timeout > 0:
            self._clock.advance(timeout)
        return events


class _VirtualLoop(asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_JumpingSelector(clock))
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.monotonic()
