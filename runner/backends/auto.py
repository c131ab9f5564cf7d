"""``--via auto``: the Batch API for the bulk, the synchronous API for what it does not finish.

Without a deadline: everything pending goes out in batches (at batch prices, under the cap and
any budget) once; the lines that come back expired or failed go through the synchronous pool
when the batches have ended, instead of waiting another 24 h in a new batch.

With ``--deadline``: a request of the job is sent synchronously first when no rate limit is
known, to learn them from its headers (the probe). While the batches run, every ``tick`` the
plan is computed again (``deadline.switch_due``): the requests not yet finished (pending, or in
a batch and not yet completed there by its last poll) through the synchronous API at the
limits, with the margin and slack. When the time left comes down to that, the switch is
recorded (an event, durable before anything is cancelled), the open batches are cancelled, and
the synchronous pool sends what is pending while the cancelled batches finish cancelling; what
they finished is recorded and billed at batch prices, and the lines they did not run come back
to pending for the pool. A request is held by a batch or by the pool, never both: the pool
claims only pending requests. A run that starts after the switch (a crash, a Ctrl-C) switches
again at once: it re-attaches the batches, cancels any still open, and goes on synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

from ..clock import SYSTEM, Clock
from ..deadline import TailLimits, switch_due, sync_seconds
from ..durations import span
from ..engine import Books, Control, RunOutcome
from ..settings import Deadline, Limits
from ..store import SWITCH_EVENT, Beat, RequestState
from .batch import BatchBackend
from .sync import SyncBackend


class AutoBackend:
    """The Batch API first, the synchronous pool after it or by the deadline."""

    name = "auto"

    def __init__(
        self,
        batch: BatchBackend,
        sync: SyncBackend,
        deadline: Deadline,
        limits: Limits,
        clock: Clock = SYSTEM,
    ) -> None:
        self.batch = batch
        self.sync = sync
        self.deadline = deadline
        self.given = limits
        self.clock = clock
        self.switched_at: float | None = None  # epoch seconds (this run's clock)
        self._books: Books | None = None

    # -- the plan -------------------------------------------------------------------------------

    def limits(self) -> TailLimits:
        """The limits the sync tail runs at: given, else learned, else the pool's own bound."""
        if self.given.rpm or self.given.tpm:
            return TailLimits(self.given.rpm, self.given.tpm, "given")
        governor = self.sync.governor
        rpm = governor.requests.limit if governor.requests is not None else None
        tpm = governor.tokens.limit if governor.tokens is not None else None
        if rpm or tpm:
            return TailLimits(rpm, tpm, "learned")
        latency = self.sync.latency
        if latency:
            rpm = int(self.sync.ceiling / max(latency, 0.001) * 60)
            return TailLimits(rpm, None, "concurrency")
        return TailLimits(None, None, "unknown")

    async def left(self, books: Books) -> tuple[int, int]:
        """(requests, tokens) not yet finished: pending or reserved, less what the open batches
        completed by their last poll (their output brings those in)."""
        counts = await books.counts((RequestState.PENDING, RequestState.RESERVED))
        unfinished = sum(counts.values())
        completed = sum(i.completed for i in self.batch.open_batches)
        n = max(0, unfinished - completed)
        job = books.job
        per = (job.input_tokens + job.output_limit_tokens) / job.requests if job.requests else 0
        return n, int(n * per)

    # -- the run --------------------------------------------------------------------------------

    async def run(self, books: Books, control: Control) -> RunOutcome:
        self._books = books
        lane = books.lane(batch=True)
        lane.start()
        batch_task: asyncio.Task[RunOutcome] | None = None
        try:
            resumed = False
            if self.deadline.at is not None:
                found = await books.last_event(SWITCH_EVENT)
                resumed = found is not None
                if not resumed and not (self.given.rpm or self.given.tpm):
                    await self._probe(books, control)
                    if control.stopping:
                        return RunOutcome.COMPLETE
            batch_task = asyncio.create_task(self.batch.run(lane, control))
            if self.deadline.at is not None:
                if resumed:
                    books.notice("the deadline's switch happened before: sending synchronously")
                    self.batch.switch()
                    self.switched_at = self.clock.now()
                else:
                    await self._watch(batch_task, books, control)
                if self.batch._switching:
                    await self._first_of(batch_task, self.batch.cancels_sent.wait())
            else:
                await asyncio.wait({batch_task})
            return await self._tail(batch_task, books, control)
        finally:
            if batch_task is not None:
                if not batch_task.done():
                    batch_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(batch_task, return_exceptions=True)
            await lane.close()

    async def _probe(self, books: Books, control: Control) -> None:
        """One request synchronously, to learn the rate limits from its answer's headers."""
        self.sync.most = 1
        try:
            await self.sync.run(books, control)
        finally:
            self.sync.most = None
        books.notice(f"rate limits for the deadline's plan: {self.limits().describe()}")

    async def _watch(
        self, batch_task: asyncio.Task[RunOutcome], books: Books, control: Control
    ) -> None:
        """Compute the plan every tick while batches run; switch when it is due."""
        deadline = self.deadline
        assert deadline.at is not None
        while not batch_task.done() and not control.stopping:
            n, weight = await self.left(books)
            limits = self.limits()
            latency = self.sync.latency or 1.0
            now = self.clock.now()
            if switch_due(now, deadline, n, weight, limits, latency):
                await self._switch(books, n, weight, limits, latency, now)
                return
            await self._first_of(batch_task, self.clock.sleep(deadline.tick))

    async def _switch(
        self, books: Books, n: int, weight: int, limits: TailLimits, latency: float, now: float
    ) -> None:
        assert self.deadline.at is not None
        tail = sync_seconds(n, weight, limits, latency)
        shown = "?" if tail is None else span(tail)
        text = (
            f"deadline switch: {span(self.deadline.at - now)} left and {n:,} request(s) not "
            f"finished ({shown} through the synchronous API at {limits.describe()}): cancelling "
            f"{len(self.batch.open_batches)} open batch(es); the rest goes synchronously"
        )
        books.event(SWITCH_EVENT, max(0.0, self.deadline.at - now), text[:500])
        await books.flush()  # durable before anything is cancelled
        books.notice(text)
        self.switched_at = now
        self.batch.switch()

    async def _tail(
        self, batch_task: asyncio.Task[RunOutcome], books: Books, control: Control
    ) -> RunOutcome:
        """The synchronous pool on what is pending, while (and after) the batches end."""
        outcome = RunOutcome.COMPLETE
        while not control.stopping:
            batches_done = batch_task.done()
            outcome = await self.sync.run(books, control)
            if control.stopping or batches_done:
                break
            # The batches still hold requests: what they hand back is sent next round.
            await self._first_of(batch_task, self.clock.sleep(self.deadline.tick))
        if batch_task.done() and not batch_task.cancelled():
            result = batch_task.result()
            if result is not RunOutcome.COMPLETE and outcome is RunOutcome.COMPLETE:
                return result
        return outcome

    @staticmethod
    async def _first_of(task: asyncio.Task[RunOutcome], other: object) -> None:
        waiter = asyncio.ensure_future(other)  # type: ignore[arg-type]
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def on_beat(self, beat: Beat) -> None:
        self.sync.on_beat(beat)

    async def aclose(self) -> None:
        await self.sync.aclose()  # the one transport both lanes share
        if self.batch._dir is not None:
            shutil.rmtree(self.batch._dir, ignore_errors=True)
