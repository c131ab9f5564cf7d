"""The synchronous API through a worker pool: each request its own HTTP call, as fast as the
rate limits allow.

A feeder claims requests ahead of the workers (so no worker waits on the database for its next
one); workers send them through the transport under the governor and settle them in the books.
The pool sizes itself: in flight = rate x latency (Little's law), from the limit the governor
knows and the latency it observes, plus what the limits let go at once now (a limit starts full,
so a minute's worth may leave in a burst), or (no limit known) from the throughput it achieves,
within ``--concurrency``.

Failures are sorted by what they cost:
- a rate-limit 429 is governed, not failed: it never counts against ``--max-attempts``;
- a connection that was never made sent nothing: no charge, no attempt used; the whole pool
  backs off while the API is unreachable, and the run stops with UNREACHABLE past the limit;
- the same refusal on every one of the first requests (a wrong base URL or key) stops the run
  as a usage error, leaving those requests pending instead of failing them;
- anything that may have been billed (a timeout, a dropped or malformed response) is charged
  its worst case, durably, before the request is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from ..clock import SYSTEM, Clock
from ..endpoints import endpoint_for
from ..engine import Books, Control, RunOutcome
from ..errors import BatchrunError
from ..governor import Governor
from ..pricing import tier_of_json
from ..retry import (
    UNREADABLE,
    Action,
    Backoff,
    Verdict,
    classify,
    describe_body,
    fatal_message,
)
from ..settings import Limits, Retry
from ..store import Beat, Claim, PendingRequest
from ..transport import OpenAITransport, Outcome

_RESIZE_EVERY = 0.5  # seconds between pool resizes
_HEADROOM = 1.25  # in flight over what rate x latency needs at the steady rate
_LATENCY_SMOOTHING = 0.2  # weight of the newest latency in the running average
_THROUGHPUT_WINDOW = 5.0  # seconds of completions behind the observed throughput
_MIN_POOL = 8
_MAX_PREFETCH = 1024
_OUTAGE_FIRST_WAIT = 0.25
_OUTAGE_MAX_WAIT = 5.0
_JOIN_WAIT = 1.0  # seconds a runner joining busy runners waits for them to rebalance


class _Pool:
    """A resizable limit on requests in flight."""

    def __init__(self, initial: int, ceiling: int, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.ceiling = ceiling
        self.size = min(initial, ceiling)
        self.in_use = 0
        self._free = asyncio.Condition()
        self.latency: float | None = None
        self.known = asyncio.Event()  # the first latency was observed: the pool can be sized
        self._finished: deque[float] = deque()  # completion times over the last few seconds

    async def acquire(self) -> None:
        async with self._free:
            await self._free.wait_for(lambda: self.in_use < self.size)
            self.in_use += 1

    async def release(self) -> None:
        async with self._free:
            self.in_use -= 1
            self._free.notify()

    def observe(self, latency: float) -> None:
        now = self.clock.monotonic()
        self._finished.append(now)
        self._forget(now)  # here too: with a known rate nothing else reads them
        if self.latency is None:
            self.latency = latency
            self.known.set()
        else:
            self.latency += _LATENCY_SMOOTHING * (latency - self.latency)

    def throughput(self) -> float:
        self._forget(self.clock.monotonic())
        return len(self._finished) / _THROUGHPUT_WINDOW

    def _forget(self, now: float) -> None:
        """Drop completions older than the window: memory must not grow with the job."""
        finished = self._finished
        while finished and finished[0] < now - _THROUGHPUT_WINDOW:
            finished.popleft()

    def want(self, rate: float | None, headroom: float | None = None) -> int:
        """The size the pool should have (see :meth:`resize`)."""
        assert self.latency is not None
        if rate is not None:
            # What the steady rate keeps in flight, plus what the limits let go at once now:
            # a limit that starts full (or has refilled) is used at once, and the pool comes
            # down to the steady size as the bucket drains. An exhausted limit, a pause and
            # the probe all have no headroom, and a runner sharing the limits has only its
            # share of it.
            steady = math.ceil(rate * self.latency * _HEADROOM) + 2
            want = steady + math.ceil(max(0.0, headroom or 0.0))
        else:
            want = max(self.size, math.ceil(2 * self.throughput() * self.latency) + 2)
        return max(_MIN_POOL, min(self.ceiling, want))

    async def resize(self, rate: float | None, headroom: float | None = None) -> None:
        """In flight = rate x latency, with headroom, plus the ``headroom`` requests the limits
        would let go at once now; without a known rate, twice what the observed throughput
        needs, so the pool keeps growing while throughput does."""
        if self.latency is None:
            return
        size = self.want(rate, headroom)
        if size != self.size:
            async with self._free:
                self.size = size
                self._free.notify_all()


class _Outage:
    """How long the API has been unreachable, and how long to wait before the next probe.

    The wait doubles per failed probe, not per failed request: the requests that were in flight
    when the API went away all fail at once.
    """

    def __init__(self, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.since: float | None = None
        self.wait = 0.0
        self._until = 0.0

    def failed(self) -> float:
        now = self.clock.monotonic()
        if self.since is None:
            self.since = now
            self.wait = _OUTAGE_FIRST_WAIT
        elif now >= self._until:
            self.wait = min(self.wait * 2, _OUTAGE_MAX_WAIT)
        else:
            return self._until - now
        self._until = now + self.wait
        return self.wait

    def reached(self) -> None:
        self.since = None

    @property
    def seconds(self) -> float:
        return 0.0 if self.since is None else self.clock.monotonic() - self.since


@dataclass(slots=True)
class _Held:
    req: PendingRequest
    out: Outcome
    verdict: Verdict


class _FirstRefusals:
    """Until the first success, identical refusals are held instead of failed: if the first
    ``limit`` answers are all the same refusal (a wrong URL, a wrong key behind a proxy), the
    run is misconfigured and its rows must not be failed for it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = limit > 0
        self.held: list[_Held] = []
        self.stopped_on: tuple[int | None, str | None] | None = None

    def hold(self, req: PendingRequest, out: Outcome, verdict: Verdict) -> bool:
        """Whether to hold this refusal (else fail it now)."""
        if not self.open:
            return False
        key = (out.status, verdict.code)
        if self.held and (self.held[0].out.status, self.held[0].verdict.code) != key:
            self.open = False
            return False
        self.held.append(_Held(req, out, verdict))
        return True

    @property
    def conclusive(self) -> bool:
        return self.open and len(self.held) >= self.limit

    def close(self) -> list[_Held]:
        """Stop holding (a success or a different answer came): what was held, to fail now."""
        self.open = False
        held, self.held = self.held, []
        return held


class FlexChooser(Protocol):
    """Which attempts go at ``service_tier: "flex"`` (``--via auto``'s flex lane)."""

    def flex_for(self, req: PendingRequest) -> float | None:
        """None: send this attempt as it is (the standard tier); else send it at flex within
        this many seconds (inf: the transport's own timeout)."""
        ...

    def flex_refused(self, req: PendingRequest, message: str) -> None:
        """The API answered a flex attempt 400 naming the tier: the model is not
        flex-capable here (the attempt is sent again at the standard tier)."""
        ...


def with_flex(body: str) -> str:
    """A stored request body (a JSON object without ``service_tier``) asking for flex: the
    same bytes, with the tier first."""
    start = body.index("{") + 1
    rest = body[start:]
    sep = "" if rest.lstrip().startswith("}") else ","
    return '{"service_tier":"flex"' + sep + rest


def _refuses_flex(out: Outcome) -> bool:
    """A 400 that names the service tier (its message or its ``param``): some providers and
    gateways answer a flex request for a model without flex this way, not with a fallback."""
    if out.status != 400:
        return False
    text = out.body[:8192].lower()
    return b"service_tier" in text or b"service tier" in text or b"flex" in text


def _asks_flex(req: PendingRequest) -> bool:
    """Whether the job file's own body asks for the flex tier (slower: its longer timeout)."""
    return tier_of_json(req.body) == "flex"


class SyncBackend:
    """Sends each request through ``transport`` under ``governor``."""

    name = "sync"

    def __init__(
        self,
        transport: OpenAITransport,
        governor: Governor,
        limits: Limits,
        retry: Retry,
        seed: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.transport = transport
        self.governor = governor
        self.clock = clock or governor.clock  # one clock: the governor's buckets go by it
        self.limits = limits
        self.retry = retry
        self.backoff = Backoff(retry.backoff_base, retry.backoff_max, retry.max_wait)
        self._rng = random.Random(seed)
        self._pool = _Pool(
            min(limits.initial_concurrency, limits.concurrency), limits.concurrency, self.clock
        )
        self._ready: asyncio.Queue[PendingRequest] = asyncio.Queue()
        self._taken = asyncio.Event()
        self._left = asyncio.Event()  # a request of ours was done with (see _wait_left)
        self._on_wire: set[int] = set()
        self._holding: dict[int, PendingRequest] = {}  # claimed by a worker, sent or not
        self._outage = _Outage(self.clock)
        self._refusals = _FirstRefusals(retry.same_error_limit)
        self._capacity: dict[int, int] = {}  # request -> flex capacity 429s it met
        self._answered = False  # a readable answer has come: the server speaks the API
        self._unreadable = 0  # unreadable 2xx answers before the first readable one
        self._books: Books | None = None
        self._control: Control | None = None
        self._failure: Exception | None = None
        self._joined = False  # the first heartbeat has been seen
        # Most requests one run may claim (``--via auto``'s probe of the rate limits sends one);
        # None: all it can.
        self.most: int | None = None
        self._claimed = 0
        # ``--via auto``'s flex lane: which attempts go at service_tier flex (None: none).
        self.flex: FlexChooser | None = None

    # -- the run --------------------------------------------------------------------------------

    async def run(self, books: Books, control: Control) -> RunOutcome:
        self._books, self._control = books, control
        control.listeners.append(self._taken.set)
        workers = [asyncio.create_task(self._worker()) for _ in range(self._pool.ceiling)]
        sizer = asyncio.create_task(self._sizer())
        try:
            result = await self._feed()
            # Let the workers finish what they hold (they exit when the queue is drained).
            while self._holding or not self._ready.empty():
                await books.wait_settlement(0.1)
            return result
        except BaseException:
            self._abandon()
            raise
        finally:
            for task in (*workers, sizer):
                task.cancel()
            await asyncio.gather(*workers, sizer, return_exceptions=True)
            self._abandon()
            for held in self._refusals.close():
                self._fail(held)
            if self._failure is not None:
                raise self._failure

    def _abandon(self) -> None:
        """Leave the books conservative for everything this backend still holds: a request on
        the wire is charged its worst case; every reservation goes back to pending."""
        books = self._books
        assert books is not None
        while not self._ready.empty():
            books.release(self._ready.get_nowait())
        for rid, req in list(self._holding.items()):
            if rid in self._on_wire:
                books.charge_unknown(req)
            books.release(req, "stopped before it finished")
        self._holding.clear()
        self._on_wire.clear()
        books.stats.in_flight = 0

    async def _feed(self) -> RunOutcome:
        """Claim requests in file order while they fit under the cap, and queue them."""
        books, control = self._books, self._control
        assert books is not None and control is not None
        self._claimed = 0
        while not control.stopping:
            if self.most is not None and self._claimed >= self.most:
                return RunOutcome.COMPLETE  # run() lets what is held finish
            if books.recheck:
                await self._recheck()
                continue
            # Claims are database round trips: take them in chunks of at least half the
            # queue, refilled when it runs half empty. What is claimed ahead is what a kill -9
            # leaves charged at worst case, so the queue stays near the pool's size.
            prefetch = self._prefetch()
            if self._ready.qsize() >= prefetch // 2:
                self._taken.clear()
                await self._taken.wait()
                continue
            # Settlements are committed by the writer a moment after they happen, and a claim
            # checks the cap against the committed books: a claim made with nothing of ours in
            # flight commits what is waiting first, so it sees every settlement of ours.
            idle = not self._mine()
            if idle:
                await books.flush()
            self._left.clear()
            want = prefetch - self._ready.qsize()
            if self.most is not None:
                want = min(want, self.most - self._claimed)
            claim = await books.claim(want)
            if self._take(claim):
                continue
            if claim.blocked and not idle and await books.flush() is not None:
                continue  # settlements were waiting to be committed: they may free room
            if self._mine():
                # Requests of ours are in flight or waiting to retry: what they settle may
                # free room under the cap, or hand a request back.
                await self._wait_left(1.0)
                continue
            if not idle:
                # The claim was made while requests of ours were in flight: it proves nothing
                # about the cap. Claim again, now that they have settled.
                continue
            if await books.open_elsewhere(0) > 0:
                await books.wait_settlement(1.0)  # other runners hold requests: wait for them
                continue
            if claim.blocked and claim.spend.reserved_pico:
                # The claim's books held reservations that are gone now (other runners
                # settled them since, or open Batch API batches hold them): the last word is a
                # claim against what is left.
                claim = await books.claim(want)
                if self._take(claim):
                    continue
            # Nothing of ours in flight, nothing reserved by live runners that may come back,
            # everything committed: the next request's worst case does not fit (or none is
            # left).
            return RunOutcome.CAPPED if claim.blocked else RunOutcome.COMPLETE
        return RunOutcome.COMPLETE

    def _mine(self) -> int:
        """Requests this runner holds: queued, in flight, waiting to retry, or held refusals."""
        return len(self._holding) + self._ready.qsize() + len(self._refusals.held)

    def _take(self, claim: Claim) -> bool:
        """Queue what a claim reserved; whether it reserved anything."""
        for req in claim.requests:
            self._ready.put_nowait(req)
        self._claimed += len(claim.requests)
        return bool(claim.requests)

    async def _wait_left(self, timeout: float) -> None:
        """Wait until a request of ours is done with (settled, failed or handed back) since the
        last claim began: set in the worker, so one that finished during the claim's round
        trip is not missed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._left.wait()

    async def _recheck(self) -> None:
        """After an allowed unbounded request cost more than its worst case: hand back what
        was claimed ahead, let what is in flight settle, and only then claim again (the claim
        checks the cap against the books, overrun included)."""
        books = self._books_()
        while not self._ready.empty():
            books.release(self._ready.get_nowait())
        while self._on_wire:
            await books.wait_settlement(0.1)
        await books.flush()
        books.recheck = False

    def _prefetch(self) -> int:
        """How many requests to hold claimed ahead: twice the pool (at least 64), or, under a
        known rate limit, no more than a second's worth beyond the pool. Runners sharing a job
        then end together, instead of one sending its last claims at its share of the rate
        while the others have nothing left."""
        prefetch = max(64, 2 * self._pool.size)
        rate = self.governor.rate()
        if rate is not None:
            prefetch = min(prefetch, self._pool.size + math.ceil(rate))
        return max(2, min(prefetch, _MAX_PREFETCH))

    async def _sizer(self) -> None:
        books = self._books
        assert books is not None
        pool, governor = self._pool, self.governor
        # The first answer (the probe's) tells the latency and the limits: size the pool at
        # once, so the burst a full limit allows does not wait for the next tick.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_RESIZE_EVERY):
                await pool.known.wait()
        while True:
            rate = governor.rate()
            await pool.resize(rate, governor.headroom())
            books.stats.limit_rate = rate
            books.stats.concurrency = pool.size
            books.stats.paused_for = governor.paused_for
            await self.clock.sleep(_RESIZE_EVERY)

    @property
    def latency(self) -> float | None:
        """The latency of an answer, as the pool has seen it (None: nothing answered yet)."""
        return self._pool.latency

    @property
    def ceiling(self) -> int:
        return self._pool.ceiling

    def on_beat(self, beat: Beat) -> None:
        self.governor.set_share(beat.share or 1.0 / max(beat.live_runners, 1))
        if not self._joined:
            self._joined = True
            if beat.others_sending:
                # Joining runners already at work: hold on until their heartbeats have seen
                # this one and lowered their shares, or together they would pass the limit.
                self.governor.pause(_JOIN_WAIT)
        if beat.paused_until > self.clock.now():
            self.governor.pause_until_epoch(beat.paused_until)

    async def aclose(self) -> None:
        await self.transport.aclose()

    # -- workers --------------------------------------------------------------------------------

    async def _worker(self) -> None:
        control = self._control
        assert control is not None
        pool = self._pool
        while True:
            await pool.acquire()
            try:
                req = await self._ready.get()
                self._taken.set()
                self._holding[req.id] = req
                try:
                    if control.stopping:
                        self._books_().release(req)
                    else:
                        await self._process(req)
                except BatchrunError as exc:  # the store failed: nothing more can be booked
                    control.stop(RunOutcome.STORE_ERROR, str(exc))
                    control.hard.set()
                    return
                except Exception as exc:  # a bug: end the run and show it, books flushed
                    self._failure = exc
                    control.hard.set()
                    return
                finally:
                    self._holding.pop(req.id, None)
                    self._capacity.pop(req.id, None)  # done with: its tries are not kept
                    self._left.set()
            finally:
                await pool.release()

    def _books_(self) -> Books:
        assert self._books is not None
        return self._books

    async def _process(self, req: PendingRequest) -> None:
        books, control = self._books_(), self._control
        assert control is not None
        endpoint = endpoint_for(req.url)
        assert endpoint is not None
        weight = req.input_tokens + req.output_limit
        number = req.attempts
        while True:
            ticket = await self.governor.acquire(weight)
            if control.stopping or books.recheck:
                self.governor.done(ticket, {})
                books.release(req, "stopped before it was sent" if req.attempts else None)
                return
            number += 1
            started = self.clock.now()
            # The flex lane decides per attempt: one sent again after the fallback (or after a
            # refusal of flex) goes at the standard tier.
            flex = self.flex.flex_for(req) if self.flex is not None else None
            body = req.body if flex is None else with_flex(req.body)
            timeout = None if flex is None or math.isinf(flex) else flex
            self._on_wire.add(req.id)
            books.stats.in_flight += 1
            try:
                out = await self.transport.send(
                    endpoint.path, body, timeout, flex=flex is not None or _asks_flex(req)
                )
            finally:
                self._on_wire.discard(req.id)
                books.stats.in_flight -= 1
            try:
                verdict = classify(out, endpoint, req.body, now=self.clock.now())
            except Exception:  # never lose a billed answer to a parsing surprise
                verdict = Verdict(Action.RETRY, "invalid_response", maybe_billed=True)
            with contextlib.suppress(Exception):  # nonsense headers must not cost the result
                self.governor.done(ticket, out.headers, passed=not verdict.rate_limited)
            self._pool.observe(out.latency)
            refused_flex = flex is not None and _refuses_flex(out)
            # Rate limits, refused connections, flex capacity and a refusal of flex itself are
            # not the request's fault: they do not use up its attempts.
            counted = not (
                verdict.rate_limited or verdict.kind in ("connect", "capacity") or refused_flex
            )
            if counted:
                req.attempts += 1
            books.attempt(
                req, number, started, out.latency, out.status,
                "flex_refused" if refused_flex
                else None if verdict.action is Action.OK else verdict.kind,
            )  # fmt: skip
            if verdict.kind != "connect":
                self._outage.reached()
            if verdict.code != UNREADABLE:
                self._answered = True
            elif not self._answered and await self._unreadable_first(req, out, verdict):
                return
            if refused_flex:
                assert self.flex is not None
                self.flex.flex_refused(req, verdict.message or f"HTTP {out.status}")
                continue  # not billed (a 400): sent again at the standard tier
            if verdict.action is Action.OK:
                for held in self._refusals.close():
                    self._fail(held)
                books.succeed(
                    req,
                    verdict.data or {},
                    out.body.decode("utf-8", "replace"),
                    status=out.status or 200,
                    api_request_id=out.headers.get("x-request-id"),
                    latency=out.latency,
                )
                return
            books.stats.error(verdict.kind)
            if verdict.action is Action.FAIL:
                self._refuse(req, out, verdict)
                return
            if verdict.action is Action.FATAL:
                books.release(req, verdict.message)
                control.stop(RunOutcome.FATAL, fatal_message(verdict.kind, verdict.message))
                return
            if not await self._before_retry(req, out, verdict):
                return
            books.stats.retries += 1

    async def _before_retry(self, req: PendingRequest, out: Outcome, verdict: Verdict) -> bool:
        """Book what the failed attempt may have cost and wait; False if the request is done
        with (failed, or handed back)."""
        books, control = self._books_(), self._control
        assert control is not None
        if verdict.maybe_billed:
            books.charge_unknown(req)
            # The charge must be durable before the request can be billed again: a crash in
            # between would leave one reservation standing for two bills.
            spend = await books.flush()
            if spend is not None and (
                spend.total_pico > books.stats.cap_pico or await books.over_budget(req)
            ):
                books.release(req, verdict.message)  # its retry no longer fits under the cap
                return False
        if verdict.rate_limited:
            books.stats.rate_limited += 1
            hint = self._server_wait(verdict.retry_after)
            wait = self.governor.rate_limited(out.headers, hint, verdict.limit_kind)
            if self.governor.paused_for > 0:
                books.event("rate_limit_pause", self.governor.paused_for)
                books.members.share_pause(self.governor.paused_for)  # the other runners hold too
        elif verdict.kind == "capacity":
            # Flex capacity is short: back off (growing per request, up to --backoff-max or
            # the server's retry-after), without pausing the others (not a rate limit).
            tries = self._capacity[req.id] = self._capacity.get(req.id, 0) + 1
            books.stats.capacity_waits += 1
            if books.stats.capacity_waits == 1:
                books.notice(
                    "flex capacity is short (429 resource_unavailable): backing off and asking "
                    "again; not a rate limit (nothing pauses), not billed, no attempt used up"
                )
            wait = self.backoff.delay(tries, self._server_wait(verdict.retry_after), self._rng)
        elif verdict.kind == "connect":
            pause = self._outage.failed()
            if self._outage.seconds > self.retry.outage_limit:
                books.release(req, verdict.message)
                control.stop(
                    RunOutcome.UNREACHABLE,
                    f"API unreachable for {self._outage.seconds:.0f}s (limit "
                    f"{self.retry.outage_limit:.0f}s): {verdict.message}",
                )
                return False
            self.governor.pause(pause)
            books.event("unreachable", pause)
            wait = 0.0
        else:
            if req.attempts >= self.retry.max_attempts:
                books.fail(
                    req,
                    status=out.status,
                    body=out.body if out.status else None,
                    code=verdict.code or verdict.kind,
                    message=f"gave up after {req.attempts} attempts: {verdict.message}",
                    api_request_id=out.headers.get("x-request-id"),
                    latency=out.latency,
                )
                return False
            wait = self.backoff.delay(
                req.attempts, self._server_wait(verdict.retry_after), self._rng
            )
        if control.stopping:
            books.release(req, verdict.message)
            return False
        await self.clock.sleep(wait)
        return True

    async def _unreadable_first(self, req: PendingRequest, out: Outcome, verdict: Verdict) -> bool:
        """Whether the run stops here: the first answers are all unreadable (a captive portal,
        a web server's default page), so the base URL is not the API. The request is charged
        as an unknown outcome (it may have been billed) and stays pending."""
        self._unreadable += 1
        limit = self.retry.same_error_limit
        if limit <= 0 or self._unreadable < limit:  # 0: never concluded from the first answers
            return False
        books, control = self._books_(), self._control
        assert control is not None
        if not control.stopping:
            where = str(self.transport.client.base_url).rstrip("/")
            control.stop(
                RunOutcome.REFUSED,
                f"the first {self._unreadable} answers were unreadable: {where} answered HTTP "
                f"{out.status} with {describe_body(out)}. Check the base URL; the requests "
                "stay pending (each unreadable answer is booked at its worst case as an unknown "
                "outcome, in case it was billed)",
            )
        books.charge_unknown(req)
        await books.flush()
        books.release(req, verdict.message)
        return True

    def _server_wait(self, seconds: float | None) -> float | None:
        """The server's retry wait, capped at --max-wait (and said so)."""
        if seconds is None or seconds <= self.retry.max_wait:
            return seconds
        self._books_().notice(
            f"the server asked to wait {seconds:,.0f}s before retrying; waiting "
            f"{self.retry.max_wait:,.0f}s (the longest wait allowed)"
        )
        return self.retry.max_wait

    def _refuse(self, req: PendingRequest, out: Outcome, verdict: Verdict) -> None:
        """A refusal: hold it while the first answers are all the same refusal."""
        refusals, control = self._refusals, self._control
        assert control is not None
        if refusals.stopped_on == (out.status, verdict.code):
            # The run stopped because every request meets this refusal: those still coming
            # back are not failed either.
            self._books_().release(req, verdict.message)
            return
        if not refusals.hold(req, out, verdict):
            for held in refusals.close():
                self._fail(held)
            self._fail(_Held(req, out, verdict))
            return
        if refusals.conclusive:
            refusals.stopped_on = (out.status, verdict.code)
            held = refusals.close()
            for h in held:
                self._books_().release(h.req, h.verdict.message)
            status = f"HTTP {out.status}" + (f" {verdict.code}" if verdict.code else "")
            control.stop(
                RunOutcome.REFUSED,
                f"the first {len(held)} requests were all refused with {status}: "
                f"{verdict.message}. Check the base URL and the API key; the requests stay "
                "pending",
            )

    def _fail(self, held: _Held) -> None:
        out, verdict = held.out, held.verdict
        self._books_().fail(
            held.req,
            status=out.status,
            body=out.body,
            code=verdict.code,
            message=verdict.message,
            api_request_id=out.headers.get("x-request-id"),
            latency=out.latency,
        )
