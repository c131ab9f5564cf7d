"""The engine: drive one job's pending requests to completion under the spend cap.

Workers take requests in file order from a feeder that reserves each one's worst-case cost in
the store *before* it may be sent, and only while

    settled spend + open reservations + its worst case <= cap.

A finished request settles its reservation to its actual cost; when nothing more fits, the run
drains what is in flight and stops. Outcomes are written by one writer task in group commits on
the store's own thread, so the event loop never waits on disk per result.

How a request travels is the ``Executor``'s business; how fast, the ``Governor``'s; what an
outcome means, ``retry.classify``'s. The engine only keeps the books and the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import BatchrunError
from .executor import Executor
from .governor import Governor
from .pricing import PriceTable, read_usage
from .retry import Action, Backoff, classify
from .store import (
    AttemptRecord,
    ChargeRecord,
    Job,
    PendingRequest,
    ReleaseRecord,
    ResultRecord,
    Store,
)

T = TypeVar("T")


class RunOutcome(enum.Enum):
    COMPLETE = "complete"  # every request has a final result
    CAPPED = "capped"  # stopped: the next request could pass the spend cap
    FATAL = "fatal"  # the API refused the run (auth, quota)
    INTERRUPTED = "interrupted"  # a signal or the caller stopped it
    STORE_ERROR = "store_error"  # the database could not be written


@dataclass(slots=True)
class RunOptions:
    cap_pico: int
    concurrency: int = 32
    max_attempts: int = 6
    backoff: Backoff = field(default_factory=Backoff)
    grace: float = 10.0  # seconds in-flight requests get to finish when stopping
    flush_interval: float = 0.05  # group-commit period of the writer
    flush_rows: int = 1000  # commit sooner when this many outcomes wait
    seed: int | None = None  # jitter seed, for reproducible tests


@dataclass(slots=True)
class RunStats:
    """Live counters of this run (not of earlier runs of the same job)."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0
    unknown_charges: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    settled_pico: int = 0  # job total, including earlier runs
    reserved_pico: int = 0
    cap_pico: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class RunReport:
    outcome: RunOutcome
    stats: RunStats
    message: str | None = None
    signal: int | None = None  # the signal that stopped the run, if one did


class Engine:
    """Runs one job. Create it, then ``await run()``; ``stop()`` may be called from signals."""

    def __init__(
        self,
        store: Store,
        job: Job,
        executor: Executor,
        governor: Governor,
        table: PriceTable,
        options: RunOptions,
    ) -> None:
        self.store = store
        self.job = job
        self.executor = executor
        self.governor = governor
        self.table = table
        self.opts = options
        self.stats = RunStats(cap_pico=options.cap_pico)
        self._rng = random.Random(options.seed)
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-db")
        # Feeder state: the next candidates in file order, and reserved ones ready to send
        # (None tells a worker to exit). The feeder keeps up to ``_prefetch`` reserved ahead of
        # the workers, so a worker never waits for a database round trip to get its next one.
        self._cursor = -1
        self._candidates: deque[PendingRequest] = deque()
        self._ready: asyncio.Queue[PendingRequest | None] = asyncio.Queue()
        self._prefetch = max(16, options.concurrency)
        self._taken = asyncio.Event()
        self._rescan = False
        self._settled = asyncio.Event()
        # Requests on the wire (their outcome is unknown if we are cancelled).
        self._on_wire: set[int] = set()
        # Writer state.
        self._attempt_rows: list[AttemptRecord] = []
        self._charges: list[ChargeRecord] = []
        self._results: list[ResultRecord] = []
        self._releases: list[ReleaseRecord] = []
        self._flush_now = asyncio.Event()
        self._closing = False
        # Stopping.
        self._stop_dispatch = False
        self._outcome: RunOutcome | None = None
        self._message: str | None = None
        self._capped = False
        self._workers: list[asyncio.Task[None]] = []
        self._hard_stop = asyncio.Event()

    # -- plumbing -------------------------------------------------------------------------------

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    @property
    def settled(self) -> int:
        return self.stats.settled_pico

    # -- public ---------------------------------------------------------------------------------

    def stop(self, reason: RunOutcome = RunOutcome.INTERRUPTED, message: str | None = None) -> None:
        """First call: send nothing new, let in-flight requests finish within the grace period.
        A second call: stop at once (in-flight requests are charged at their worst case)."""
        if self._stop_dispatch:
            self._hard_stop.set()
            return
        self._stop_dispatch = True
        if self._outcome is None:
            self._outcome = reason
            self._message = message
        self._settled.set()
        self._taken.set()
        # In-flight requests get the grace period (a fatal API error, only a moment: more
        # requests would meet the same refusal), then the run ends regardless.
        grace = self.opts.grace if reason is RunOutcome.INTERRUPTED else min(self.opts.grace, 2.0)
        asyncio.get_running_loop().call_later(grace, self._hard_stop.set)

    async def run(self) -> RunReport:
        spend = await self._in_db(self.store.spend, self.job.id)
        self.stats.settled_pico = spend.settled_pico
        # Reservations left by a dead run were turned into charges before we got here; any
        # still open belong to nobody, so start from zero.
        self.stats.reserved_pico = 0
        writer = asyncio.create_task(self._writer())
        self._workers = [
            asyncio.create_task(self._worker()) for _ in range(max(1, self.opts.concurrency))
        ]
        feeder = asyncio.create_task(self._feeder())
        waiter = asyncio.create_task(self._wait_workers())
        hard = asyncio.create_task(self._hard_stop.wait())
        try:
            await asyncio.wait({waiter, hard}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done() or waiter.exception() is not None:
                for task in (feeder, *self._workers):
                    task.cancel()
                await asyncio.gather(feeder, *self._workers, return_exceptions=True)
            else:
                await feeder
        finally:
            hard.cancel()
            waiter.cancel()
            await self._unwind_ready()
            # Stop the writer by flag, not cancel(): a cancel racing its wake-up can be lost.
            self._closing = True
            self._flush_now.set()
            await writer
            await self._flush()
            self._db.shutdown(wait=True)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()  # a bug in a worker: surface it, the books are flushed
        outcome = self._outcome
        if outcome is None:
            outcome = RunOutcome.CAPPED if self._capped else RunOutcome.COMPLETE
        return RunReport(outcome, self.stats, self._message)

    async def _wait_workers(self) -> None:
        done, _ = await asyncio.wait(self._workers)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    # -- feeder ---------------------------------------------------------------------------------

    async def _feeder(self) -> None:
        try:
            await self._feed()
        except BatchrunError as exc:  # the store failed: nothing more can be reserved
            self.stop(RunOutcome.STORE_ERROR, str(exc))
            self._hard_stop.set()
        finally:
            for _ in self._workers:
                self._ready.put_nowait(None)

    async def _feed(self) -> None:
        """Reserve requests in file order while they fit under the cap, and queue them."""
        cap = self.opts.cap_pico
        while not self._stop_dispatch:
            if self._ready.qsize() >= self._prefetch:
                self._taken.clear()
                await self._taken.wait()
                continue
            if not self._candidates:
                batch = await self._in_db(
                    self.store.next_pending, self.job.id, self._cursor, self._prefetch
                )
                if not batch:
                    if self._rescan:
                        # Requests handed back for a later try sit behind the cursor, and the
                        # store must have their release before it can return them.
                        self._rescan = False
                        self._cursor = -1
                        await self._flush()
                        continue
                    if self.stats.reserved_pico == 0:
                        return  # nothing pending, queued or in flight: the job is finished
                    await self._wait_settlement()
                    continue
                self._candidates.extend(batch)
                self._cursor = batch[-1].seq
            room = self._prefetch - self._ready.qsize()
            fitting: list[PendingRequest] = []
            while self._candidates and len(fitting) < room:
                r = self._candidates[0]
                if self.settled + self.stats.reserved_pico + r.worst_pico > cap:
                    break
                self._candidates.popleft()
                self.stats.reserved_pico += r.worst_pico
                fitting.append(r)
            if fitting:
                await self._in_db(self.store.reserve, fitting)
                for r in fitting:
                    self._ready.put_nowait(r)
                continue
            # The next request does not fit. Settlements of requests in flight may free room
            # (actual cost < worst case); with nothing queued or in flight, the cap is reached.
            if self.stats.reserved_pico == 0:
                self._capped = True
                return
            await self._wait_settlement()

    async def _wait_settlement(self) -> None:
        self._settled.clear()
        await self._settled.wait()

    def _notify(self) -> None:
        self._settled.set()

    async def _unwind_ready(self) -> None:
        """Hand back reservations of requests that were reserved but never sent."""
        while not self._ready.empty():
            r = self._ready.get_nowait()
            if r is not None:
                self._release(r, None)

    # -- workers --------------------------------------------------------------------------------

    async def _worker(self) -> None:
        try:
            while True:
                req = await self._ready.get()
                self._taken.set()
                if req is None:
                    return
                if self._stop_dispatch:
                    self._release(req, None)
                    continue
                try:
                    await self._process(req)
                except BaseException:
                    self._abandon(req)
                    raise
        except BatchrunError as exc:  # the store failed: nothing more can be recorded
            self.stop(RunOutcome.STORE_ERROR, str(exc))
            self._hard_stop.set()

    def _abandon(self, req: PendingRequest) -> None:
        """A worker is being cancelled while holding ``req``: keep the books conservative."""
        if req.id in self._on_wire:
            self._on_wire.discard(req.id)
            self._charge_unknown(req)
        self._release(req, None)

    async def _process(self, req: PendingRequest) -> None:
        opts = self.opts
        weight = req.input_tokens + req.output_limit
        while True:
            ticket = await self.governor.acquire(weight)
            if self._stop_dispatch:
                self.governor.done(ticket, {})
                self._release(req, "stopped before retry" if req.attempts else None)
                return
            req.attempts += 1
            self.stats.attempts += 1
            started = time.time()
            self._on_wire.add(req.id)
            out = await self.executor.send(req.url, req.body)
            self._on_wire.discard(req.id)
            self.governor.done(ticket, out.headers)
            verdict = classify(out)
            self._attempt_rows.append(
                AttemptRecord(
                    req.id,
                    req.attempts,
                    started,
                    int(out.latency * 1000),
                    out.status,
                    None if verdict.action is Action.OK else verdict.kind,
                )
            )
            if verdict.action is Action.OK:
                self._succeed(req, out, verdict.data or {}, started)
                return
            self.stats.errors[verdict.kind] = self.stats.errors.get(verdict.kind, 0) + 1
            if verdict.action is Action.FAIL:
                self._fail(req, out.status, out.body, verdict.code, verdict.message, out)
                return
            if verdict.action is Action.FATAL:
                self._release(req, verdict.message)
                self.stop(RunOutcome.FATAL, _fatal_message(verdict.kind, verdict.message))
                return
            # Retry.
            if verdict.maybe_billed:
                self._charge_unknown(req)
                # The charge must be durable before the request can be billed again: a crash
                # in between would leave one reservation standing for two bills.
                await self._flush()
            if verdict.rate_limited:
                self.stats.rate_limited += 1
            if req.attempts >= opts.max_attempts:
                self._fail(
                    req,
                    out.status,
                    out.body if out.status else None,
                    verdict.code or verdict.kind,
                    f"gave up after {req.attempts} attempts: {verdict.message}",
                    out,
                )
                return
            delay = opts.backoff.delay(req.attempts, verdict.retry_after, self._rng)
            if verdict.rate_limited:
                self.governor.pause(delay)
            if self._stop_dispatch:
                self._release(req, verdict.message)
                return
            if verdict.maybe_billed and self.settled + self.stats.reserved_pico > opts.cap_pico:
                # The unknown charge used up the room this request's retry needed.
                self._release(req, verdict.message)
                self._rescan = True
                return
            self.stats.retries += 1
            await asyncio.sleep(delay)

    # -- bookkeeping (all in memory, written by the writer) ----------------------------------

    def _succeed(self, req: PendingRequest, out: Any, data: dict[str, Any], started: float) -> None:
        usage = read_usage(data)
        cost = self.table.bill(req.model, usage)
        self.stats.reserved_pico -= req.worst_pico
        self.stats.settled_pico += cost
        self.stats.done += 1
        self.stats.input_tokens += usage.input_tokens
        self.stats.output_tokens += usage.output_tokens
        self._results.append(
            ResultRecord(
                request_id=req.id,
                state="done",
                attempts=req.attempts,
                status_code=out.status,
                body=out.body.decode("utf-8", "replace"),
                response_model=usage.model,
                api_request_id=out.headers.get("x-request-id"),
                prompt_tokens=usage.input_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.output_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost_pico=cost,
                latency_ms=int(out.latency * 1000),
                finished_at=time.time(),
            )
        )
        self._wrote()

    def _fail(
        self,
        req: PendingRequest,
        status: int | None,
        body: bytes | None,
        code: str | None,
        message: str | None,
        out: Any,
    ) -> None:
        self.stats.reserved_pico -= req.worst_pico
        self.stats.failed += 1
        self._results.append(
            ResultRecord(
                request_id=req.id,
                state="failed",
                attempts=req.attempts,
                status_code=status,
                body=body.decode("utf-8", "replace") if body else None,
                response_model=None,
                api_request_id=out.headers.get("x-request-id") if out.headers else None,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                reasoning_tokens=0,
                cost_pico=0,
                latency_ms=int(out.latency * 1000),
                finished_at=time.time(),
                error_code=code,
                error_message=message,
            )
        )
        self._wrote()

    def _charge_unknown(self, req: PendingRequest) -> None:
        self.stats.settled_pico += req.worst_pico
        self.stats.unknown_charges += 1
        self._charges.append(ChargeRecord(req.id, req.worst_pico, time.time()))

    def _release(self, req: PendingRequest, message: str | None) -> None:
        self.stats.reserved_pico -= req.worst_pico
        self._releases.append(ReleaseRecord(req.id, req.attempts, message))
        self._wrote()

    def _wrote(self) -> None:
        self._notify()
        if len(self._results) + len(self._releases) >= self.opts.flush_rows:
            self._flush_now.set()

    # -- writer ---------------------------------------------------------------------------------

    async def _writer(self) -> None:
        """Group commit: every ``flush_interval``, or sooner when many outcomes wait."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.opts.flush_interval):
                    await self._flush_now.wait()
            self._flush_now.clear()
            try:
                await self._flush()
            except BatchrunError as exc:
                self.stop(RunOutcome.STORE_ERROR, str(exc))
                self._hard_stop.set()
                return

    async def _flush(self) -> None:
        if not (self._attempt_rows or self._charges or self._results or self._releases):
            return
        batch = (self._attempt_rows, self._charges, self._results, self._releases)
        self._attempt_rows, self._charges, self._results, self._releases = [], [], [], []
        await self._in_db(self.store.record, self.job.id, *batch)


def _fatal_message(kind: str, message: str | None) -> str:
    what = {
        "auth": "the API rejected the API key (HTTP 401/403)",
        "quota": "the account has no quota left",
    }.get(kind, "the API refused the run")
    return f"{what}: {message}" if message else what
