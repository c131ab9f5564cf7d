"""Runner membership: this runner among the job's runners.

A heartbeat says it is alive and how much it has in flight (each runner governs at its share
of the rate limits); a beat also takes over the claims of runners that died, and a 429 that
exhausted the organization's limit is shared so the others hold too. All of it runs on a
thread and connection of its own: a big group commit, or a commit waiting for a lock, must not
make this runner miss its heartbeat or hear of a pause late; nor may a stuck heartbeat delay a
commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..clock import SYSTEM, Clock
from ..errors import BatchrunError
from ..store import Beat, Store

T = TypeVar("T")


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Membership:
    """One runner's heartbeat, take-overs and shared pauses for one job."""

    def __init__(self, store: Store, job_id: int, runner_id: int, clock: Clock = SYSTEM) -> None:
        self.store = store
        self.job_id = job_id
        self.runner_id = runner_id
        self.clock = clock
        self.host = socket.gethostname()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-beat")
        self._shared_until = 0.0  # the latest pause told to the other runners (epoch seconds)
        self._sharing: set[asyncio.Task[None]] = set()
        self._closing = False

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, lambda: fn(*args))

    async def beat(self, ttl: float, in_flight: int) -> Beat:
        """Renew this runner's heartbeat; take over the claims of runners that died."""
        beat = await self._call(self.store.heartbeat, self.runner_id, ttl, in_flight)
        if beat.alive:
            await self._call(self.store.recover, self.job_id, self.host, process_alive)
        return beat

    async def keep(
        self,
        ttl: float,
        in_flight: Callable[[], int],
        on_beat: Callable[[Beat], None],
        on_dead: Callable[[], None],
    ) -> None:
        """Beat until cancelled, at once and then twice a second at most: a pause another
        runner shared, or a runner joining or leaving, reaches this one within a second (a beat
        plus its transaction). ``on_dead``: another process declared this one dead (it missed
        its heartbeat) and took over its requests; the loop ends."""
        period = min(ttl / 3, 0.5)
        while True:
            # The first beat comes at once: the runner learns its share of the rate limits (and
            # any pause another runner met) before it sends much.
            try:
                beat = await self.beat(ttl, in_flight())
            except BatchrunError:
                beat = None  # a missed beat is retried; expiry leaves slack
            if beat is not None and not beat.alive:
                on_dead()
                return
            if beat is not None:
                on_beat(beat)
            await self.clock.sleep(period)

    def share_pause(self, seconds: float) -> None:
        """Tell the job's other runners (through the database) to hold their requests for
        ``seconds`` too: a 429 says the organization's limit is exhausted, not this runner's.
        Does not wait for the write; many workers meeting the same 429 write it once."""
        until = self.clock.now() + seconds
        if until <= self._shared_until + 0.05 or self._closing:
            return
        self._shared_until = until
        task = asyncio.ensure_future(self._share(until))
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    async def _share(self, until: float) -> None:
        with contextlib.suppress(BatchrunError):  # best effort: the others meet the 429 too
            await self._call(self.store.share_pause, self.job_id, until)

    async def close(self) -> None:
        """Finish the pauses being shared and let the thread go."""
        self._closing = True
        try:
            if self._sharing:
                await asyncio.gather(*self._sharing, return_exceptions=True)
        finally:
            self._thread.shutdown(wait=True)
