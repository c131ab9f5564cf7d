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

Cancelling takes time (the Batch API's ``cancelling`` lasts up to ~10 minutes), and the lines a
cancelling batch holds come back to pending only when it has cancelled: so no result of a
cancelled batch can arrive after its request went sync. The plan counts that wait instead
(``Deadline.cancel``, ``--deadline-cancel``): while batches are open the switch comes that much
earlier.

The flex lane: the requests of the models the price table marks flex-capable go, from the
switch (or, without a deadline, in the straggler tail), with ``service_tier: "flex"`` (at flex
prices, the Batch API's unless the table has its own), and the switch comes early enough for
them too (their time at the limits at ``Deadline.flex_latency`` per answer, with the margin).
When the time left comes down to what the requests not yet finished need at the standard tier
(with the margin and slack), the lane falls back: what is left goes at the standard tier, and
a flex answer still out is not waited for past the slack. Each attempt decides afresh, so one
sent again after the fallback, after a capacity 429, or after the API refused flex for its model
with a 400 (then the model goes standard for the rest of the run, said once), goes standard.
Flex requests are reserved at their standard worst case (a flex request may be served, and
billed, at the standard tier) and settled at the tier the response reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil

from ..clock import SYSTEM, Clock
from ..deadline import TailLimits, planned_seconds, switch_due, sync_seconds
from ..durations import span
from ..engine import Books, Control, RunOutcome
from ..settings import Deadline, Limits
from ..store import SWITCH_EVENT, Beat, PendingRequest, RequestState
from .batch import BatchBackend
from .sync import SyncBackend

FLEX_FALLBACK_EVENT = "flex_fallback"  # the flex lane went to the standard tier (a deadline)
FLEX_REFUSED_EVENT = "flex_refused"  # a model's flex request was answered 400 (detail: model)


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
        # The flex lane: the job's models the price table marks flex-capable (less those the
        # API refused flex for in this run), the share of the open requests they hold, whether
        # the tail sends them at flex now, and by when (this run's clock) it falls back.
        self.flex_models: set[str] = set()
        self.flex_refused_models: set[str] = set()
        self._flex_share = 0.0
        self.flex_on = False
        self._fallback_at: float | None = None
        self.fell_back_at: float | None = None

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

    def flex_split(self, n: int, weight: int) -> tuple[int, int]:
        """Of ``n`` requests not yet finished (``weight`` tokens), those of the flex lane."""
        if not self.flex_models or self._flex_share <= 0:
            return 0, 0
        return math.ceil(n * self._flex_share), math.ceil(weight * self._flex_share)

    async def _find_flex(self, books: Books) -> None:
        """The job's flex-capable models (as the price table marks them) and their share of
        the requests not yet finished (those asking for a tier of their own left out)."""
        if not books.table.marks_flex:
            return  # the usual case (the bundled table marks no model): no read of the bodies
        opened = await books.open_by_model()
        flex = {m for m in opened if books.table.resolve(m).flex_capable}
        counts = await books.counts((RequestState.PENDING, RequestState.RESERVED))
        total = sum(counts.values())
        self.flex_models = flex
        self._flex_share = sum(opened[m][0] for m in flex) / total if total else 0.0

    # -- the flex lane (``sync.FlexChooser``) ---------------------------------------------------

    def flex_for(self, req: PendingRequest) -> float | None:
        """Seconds a flex attempt of ``req`` may take (inf: no deadline), or None: standard."""
        if not self.flex_on or req.model not in self.flex_models:
            return None
        if '"service_tier":' in req.body:
            return None  # the request asks for a tier of its own: it goes as asked
        if self._fallback_at is None:
            return math.inf
        # A flex answer still out when the lane falls back is not waited for past the slack
        # (it is charged its worst case, in case it was billed, and sent again standard).
        return max(1.0, self._fallback_at - self.clock.now() + self.deadline.slack)

    def flex_refused(self, req: PendingRequest, message: str) -> None:
        model = req.model
        if model not in self.flex_models:
            return
        self.flex_models.discard(model)
        self.flex_refused_models.add(model)
        books = self._books
        assert books is not None
        books.event(FLEX_REFUSED_EVENT, detail=f"{model}: {message}"[:500])
        books.notice(
            f"flex lane: the API refused service_tier flex for {model} (HTTP 400: {message}); "
            f"{model} is not flex-capable here: its requests go at the standard tier for the "
            "rest of the run"
        )

    def _flex_start(self, books: Books) -> None:
        if not self.flex_models or self.flex_on:
            return
        self.flex_on = True
        self._fallback_at = self.deadline.at  # the watcher's first look brings it nearer
        models = ", ".join(sorted(self.flex_models))
        until = (
            "until the time left is down to the standard tail"
            if self.deadline.at is not None
            else "(no deadline: no fallback)"
        )
        books.notice(
            f"flex lane: the synchronous tail of {models} goes with service_tier flex (at flex "
            f"prices, reserved at standard worst case) {until}; capacity 429s are waited out"
        )

    # -- the run --------------------------------------------------------------------------------

    async def run(self, books: Books, control: Control) -> RunOutcome:
        self._books = books
        lane = books.lane(batch=True)
        lane.start()
        batch_task: asyncio.Task[RunOutcome] | None = None
        watcher: asyncio.Task[None] | None = None
        self.sync.flex = self
        try:
            await self._find_flex(books)
            resumed = False
            if self.deadline.at is not None:
                found = await books.last_event(SWITCH_EVENT)
                resumed = found is not None
                fell = await books.last_event(FLEX_FALLBACK_EVENT)
                if fell is not None:
                    self.flex_models.clear()  # an earlier run fell back: standard from now on
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
                # At the switch, or when the batches ended before it (their expired or failed
                # lines): the flex lane while the time allows it.
                self._flex_start(books)
                if self.flex_on:
                    watcher = asyncio.create_task(self._watch_flex(books, control))
                if self.batch._switching:
                    await self._first_of(batch_task, self.batch.cancels_sent.wait())
            else:
                await asyncio.wait({batch_task})
                self._flex_start(books)
            return await self._tail(batch_task, books, control)
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(watcher, return_exceptions=True)
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
            # Cancelling takes time (up to ~10 minutes) while the batches hold their lines;
            # the flex lane's requests get their window before the standard tail.
            cancel = deadline.cancel if self.batch.open_batches else 0.0
            flex_left, flex_weight = self.flex_split(n, weight)
            if switch_due(
                now, deadline, n, weight, limits, latency,
                cancel=cancel, flex_left=flex_left, flex_weight=flex_weight,
            ):  # fmt: skip
                await self._switch(books, n, weight, limits, latency, now)
                return
            await self._first_of(batch_task, self.clock.sleep(deadline.tick))

    async def _watch_flex(self, books: Books, control: Control) -> None:
        """While the flex lane is on: fall back to the standard tier when the time left is
        down to what the requests not yet finished need at it (with the margin and slack, and
        what may be left of cancelling batches that still hold some of them)."""
        deadline = self.deadline
        assert deadline.at is not None
        while self.flex_on and not control.stopping:
            n, weight = await self.left(books)
            limits = self.limits()
            latency = self.sync.latency or 1.0
            now = self.clock.now()
            cancel_left = 0.0
            if self.batch.open_batches and self.switched_at is not None:
                cancel_left = max(0.0, deadline.cancel - (now - self.switched_at))
            tail = sync_seconds(n, weight, limits, latency)
            self._fallback_at = (
                now if tail is None
                else deadline.at - planned_seconds(tail, deadline) - cancel_left
            )  # fmt: skip
            if n > 0 and now >= self._fallback_at:  # deadline.flex_fallback_due
                self._fall_back(books, n, tail, now)
                return
            await self.clock.sleep(deadline.tick)

    def _fall_back(self, books: Books, n: int, tail: float | None, now: float) -> None:
        assert self.deadline.at is not None
        self.flex_on = False
        self.fell_back_at = now
        shown = "?" if tail is None else span(tail)
        text = (
            f"flex lane: {span(max(0.0, self.deadline.at - now))} left and {n:,} request(s) not "
            f"finished ({shown} at the standard tier at the limits): the rest goes at the "
            "standard tier"
        )
        books.event(FLEX_FALLBACK_EVENT, max(0.0, self.deadline.at - now), text[:500])
        books.notice(text)

    async def _switch(
        self, books: Books, n: int, weight: int, limits: TailLimits, latency: float, now: float
    ) -> None:
        assert self.deadline.at is not None
        tail = sync_seconds(n, weight, limits, latency)
        shown = "?" if tail is None else span(tail)
        flex_left, _ = self.flex_split(n, weight)
        flex = (
            f", ~{flex_left:,} of them at flex first ({', '.join(sorted(self.flex_models))})"
            if flex_left
            else ""
        )
        opened = len(self.batch.open_batches)
        cancel = f" (up to {span(self.deadline.cancel)} planned for it)" if opened else ""
        text = (
            f"deadline switch: {span(self.deadline.at - now)} left and {n:,} request(s) not "
            f"finished ({shown} through the synchronous API at {limits.describe()}): cancelling "
            f"{opened} open batch(es){cancel}; the rest goes synchronously{flex}"
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
