"""One clock for a run: where the engine, the governor, the backends, heartbeats and the
budgets' periods read the time and wait.

``Clock`` is real time. Its ``monotonic`` is the event loop's own clock (asyncio's
``loop.time()`` is ``time.monotonic()``), the one aiolimiter's buckets leak by, so the
governor's arithmetic and its buckets agree. ``now`` is epoch seconds, for what is recorded and
for budget periods.

``VirtualClock`` is fake time for tests. It runs a coroutine on an event loop of its own whose
time is the clock's: whenever the loop has nothing to do but wait for a timer, the clock jumps
to that timer instead of sleeping, so a test of a minute of backoff, heartbeats or a rate limit
takes milliseconds and never depends on the machine's speed. Work on an executor thread (the
store's calls) takes no virtual time: the clock stands still until it is done. Network I/O is
not known to the loop (it looks for it for a moment before each jump), so a test that waits on
a server with timeouts running would see them jump: keep virtual time to what runs in-process.
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
# The virtual time one turn of the loop with callbacks ready takes.
_TURN = 1e-6


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

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _VirtualLoop(self)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on a virtual-time event loop and return its result."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(coro)


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that, asked to wait ``timeout`` for I/O, looks for a moment and then, with
    nothing to report and no thread at work for the loop, moves the virtual clock on by
    ``timeout`` (to the next timer)."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock
        self.busy = 0  # executor calls under way: their threads take no virtual time

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:  # no timer at all: only I/O or a thread can wake the loop
            return super().select(None)
        if timeout <= 0:
            # Callbacks are ready (or a timer is due): each turn of the loop takes a moment,
            # as it does in real time, so a timer re-armed for a hair later (aiolimiter's, when
            # a float falls short) comes due instead of spinning at one instant.
            self._clock.advance(_TURN)
            return super().select(0)
        if self.busy:  # a thread works for the loop: wait for it in real time
            return super().select(min(timeout, 0.05))
        events = super().select(min(timeout, _LOOK))
        if not events:
            self._clock.advance(timeout)
        return events


class _VirtualLoop(asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    def __init__(self, clock: VirtualClock) -> None:
        self._jumping = _JumpingSelector(clock)
        super().__init__(self._jumping)
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.monotonic()

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        """While a thread works for the loop, time stands still: a store call takes no
        virtual time however long the machine takes for it."""
        future = super().run_in_executor(executor, func, *args)
        self._jumping.busy += 1

        def done(_: asyncio.Future[Any]) -> None:
            self._jumping.busy -= 1

        future.add_done_callback(done)
        return future
