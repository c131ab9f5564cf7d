"""The engine: one runner's run of a job, whatever carries its requests.

A backend (``backends.sync``: a worker pool on the synchronous API; ``backends.batch``: the
OpenAI Batch API) decides how requests travel. Everything about money is here, the same for
every backend:

- ``Books.claim`` reserves requests in file order, each only while settled spend + open
  reservations + its worst case fit under the cap (checked by the store, under a lock, across
  every runner of the job);
- ``Books.succeed`` / ``fail`` / ``charge_unknown`` / ``release`` settle them, and a writer task
  group-commits those outcomes on the store's own thread, so the event loop never waits on disk
  per result;
- ``Control`` says when to stop: a signal, a fatal answer, the cap, an overrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from . import structured
from .budgets import BudgetBooks
from .calibration import PPM, Calibration, ModelCalibration
from .endpoints import Endpoint, Usage, endpoint_for
from .errors import BatchrunError
from .money import format_usd
from .pricing import Bill, PriceTable, tier_of_json
from .redact import redact
from .settings import Calibrating, Stopping, Writer
from .store import (
    AttemptRecord,
    Beat,
    ChargeRecord,
    Claim,
    EventRecord,
    Job,
    Outcomes,
    PendingRequest,
    ReleaseRecord,
    RequestState,
    ResultFlag,
    ResultRecord,
    Spend,
    Store,
)

T = TypeVar("T")


class RunOutcome(enum.Enum):
    """How a run ended."""

    COMPLETE = "complete"  # every request has a final result (some may have failed)
    CAPPED = "capped"  # stopped: the next request could pass the spend cap
    OVERRUN = "overrun"  # stopped: a response cost more than its reserved worst case
    FATAL = "fatal"  # the API refused the run (auth, quota)
    UNREACHABLE = "unreachable"  # the API could not be reached for longer than the limit
    REFUSED = "refused"  # the first requests were all refused the same way (wrong URL or key)
    STORE_ERROR = "store_error"  # the database could not be written
    INTERRUPTED = "interrupted"  # a signal (or the caller) stopped it
    DETACHED = "detached"  # Batch API: stopped watching; the batches go on at OpenAI
    BATCHES_OPEN = "batches_open"  # all that is left is in batches open at OpenAI
    SAMPLED = "sampled"  # ``price --sample``: the sample has its results; the rest waits
    UNPRICED = "unpriced"  # --strict-models: a response the price table cannot price arrived


@dataclass(slots=True)
class RunStats:
    """Live counters of this run, for progress and the final report."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    rate_limited: int = 0
    capacity_waits: int = 0  # flex 429s "resource_unavailable": capacity short, not a limit
    unknown_charges: int = 0
    usage_missing: int = 0
    overruns: int = 0
    overrun_pico: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    settled_pico: int = 0  # the job's books as last seen (all runners, all runs)
    reserved_pico: int = 0
    cap_pico: int = 0
    in_flight: int = 0
    concurrency: int = 0  # the pool's current size (sync backend)
    paused_for: float = 0.0  # seconds every request is held for (a pause is on)
    limit_rate: float | None = None  # requests/s the rate limits allow this runner, if known
    # Batch API: the batches this runner watches, what they report completed (not recorded
    # yet: results arrive per batch), and when the next poll is due (time.monotonic()).
    open_batches: int = 0
    batch_completed: int = 0
    next_poll: float | None = None
    # The job's projected total (total, low, high of the 95% interval), from the results in.
    projected: tuple[int, int, int] | None = None
    errors: dict[str, int] = field(default_factory=dict)
    # Results the price table could not price (a model or service tier the response names),
    # booked at worst case: name -> results.
    unpriced: dict[str, int] = field(default_factory=dict)
    # Results whose outputs are not the JSON their requests asked for: flag value -> results.
    invalid_outputs: dict[str, int] = field(default_factory=dict)
    notices: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    # The budget the run draws on, as the last claim saw it; and set when that claim stopped
    # at the budget rather than at the job's cap (the run's end then names the budget).
    budget: BudgetBooks | None = None
    budget_stop: BudgetBooks | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass(slots=True)
class RunReport:
    outcome: RunOutcome
    stats: RunStats
    message: str | None = None
    signal: int | None = None  # the signal that stopped the run, if one did


class Control:
    """When the run stops, and why.

    ``stop`` asks for an orderly stop (nothing new is sent; requests in flight get the grace
    period); calling it again changes nothing. Only a second signal (``interrupt``) or the end
    of the grace period makes it a hard stop.
    """

    def __init__(self, stopping: Stopping) -> None:
        self.grace = stopping.grace
        self.stopping = False
        self.outcome: RunOutcome | None = None
        self.message: str | None = None
        self.signal: int | None = None
        self.hard = asyncio.Event()
        self.listeners: list[Callable[[], None]] = []

    def stop(self, outcome: RunOutcome, message: str | None = None) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.outcome = outcome
        self.message = message
        for listener in self.listeners:
            listener()
        # In-flight requests get the grace period (after a fatal answer only a moment: more
        # requests would meet the same refusal), then the run ends regardless.
        grace = self.grace if outcome is RunOutcome.INTERRUPTED else min(self.grace, 2.0)
        asyncio.get_running_loop().call_later(grace, self.hard.set)

    def interrupt(self, signum: int, name: str) -> None:
        """A signal: the first stops in order, a second stops at once."""
        if self.stopping and self.signal is not None:
            self.hard.set()
            return
        self.signal = signum
        if self.stopping:  # already stopping for another reason: a signal now means "now"
            self.hard.set()
            return
        self.stop(RunOutcome.INTERRUPTED, f"stopped by {name}")


class Backend(Protocol):
    """How requests travel. ``run`` sends every request it can claim through ``books`` and
    returns how that ended (COMPLETE or CAPPED); it stops dispatching once ``control`` says so,
    and on cancellation (a hard stop) it must leave its books conservative: a request that may
    have reached the API is charged its worst case."""

    name: str  # "sync" or "batch"

    async def run(self, books: Books, control: Control) -> RunOutcome: ...

    def on_beat(self, beat: Beat) -> None: ...

    async def aclose(self) -> None: ...


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Books:
    """One runner's side of the store: claims under the cap and group-committed outcomes."""

    def __init__(
        self,
        store: Store,
        job: Job,
        runner_id: int,
        table: PriceTable,
        control: Control,
        *,
        batch: bool = False,
        allow_unbounded: bool = False,
        writer: Writer | None = None,
        calibrating: Calibrating | None = None,
        seen: Mapping[str, ModelCalibration] | None = None,
        only: frozenset[int] | None = None,
        strict_models: bool = False,
    ) -> None:
        self.store = store
        self.job = job
        self.runner_id = runner_id
        self.table = table
        self.control = control
        self.batch = batch  # settle at Batch API prices
        self.allow_unbounded = allow_unbounded
        self.only = only  # claim only these requests (by sequence number): a sample
        self.strict_models = strict_models  # stop at a response the table cannot price
        self.writer_settings = writer or Writer()
        self.stats = RunStats(cap_pico=job.cap_pico)
        # What the job's results so far taught about how the server counts tokens: the
        # requests still to send are reserved at that scale of their worst case.
        self.calibration = Calibration(calibrating)
        self.calibration.seed({m: self._against_factor(m, cal) for m, cal in (seen or {}).items()})
        self._told_scale: dict[str, int] = {}
        self.host = socket.gethostname()
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-db")
        # Heartbeats, recoveries and shared pauses have a thread (and connection) of their own:
        # a big group commit, or a commit waiting for a lock, must not make this runner miss
        # its heartbeat or hear of a pause late; nor may a stuck heartbeat delay a commit.
        self._beats = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-beat")
        self._out = Outcomes()
        # Held while outcomes are being committed: a flush waits for a commit under way, so
        # "flushed" means durable (a crash test kills right after it).
        self._committing = asyncio.Lock()
        self._spend: Spend | None = None  # the books as the last commit left them
        self._flush_now = asyncio.Event()
        self._settled = asyncio.Event()  # something settled or was released
        # Set when an allowed unbounded request cost more than its worst case: send nothing
        # new until what is in flight has settled and the cap is checked against the books.
        self.recheck = False
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._shared_until = 0.0  # the latest pause told to the other runners
        self._sharing: set[asyncio.Task[None]] = set()

    def lane(self, *, batch: bool, only: frozenset[int] | None = None) -> Books:
        """Books of the same runner and job for another lane (``--via auto``: the Batch API's
        requests are claimed and settled at batch prices, the synchronous ones at standard
        prices): the same store, control, counters and calibration, a writer of its own."""
        other = Books(
            self.store,
            self.job,
            self.runner_id,
            self.table,
            self.control,
            batch=batch,
            allow_unbounded=self.allow_unbounded,
            writer=self.writer_settings,
            only=only if only is not None else self.only,
            strict_models=self.strict_models,
        )
        other.stats = self.stats
        other.calibration = self.calibration
        return other

    # -- plumbing -------------------------------------------------------------------------------

    async def in_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    async def _in_beats(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a runner-keeping store call on the heartbeat's own thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._beats, lambda: fn(*args))

    def _against_factor(self, model: str, cal: ModelCalibration) -> ModelCalibration:
        """A stored calibration (billed over counted) as billed over expected: over what the
        price file's ``input_factor`` already reserves for."""
        price = self.table.lookup(model)
        factor = price.input_factor_ppm if price is not None else PPM
        if factor == PPM:
            return cal
        return ModelCalibration(-(-cal.input_ppm * PPM // factor), cal.output_ppm, cal.results)

    def _books_seen(self, spend: Spend) -> None:
        self.stats.settled_pico = spend.settled_pico
        self.stats.reserved_pico = spend.reserved_pico

    async def wait_settlement(self, timeout: float | None = None) -> None:
        """Wait until something settles or is released (room may have freed under the cap)."""
        self._settled.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()

    # -- claims ---------------------------------------------------------------------------------

    async def claim(self, limit: int, *, url: str | None = None, model: str | None = None) -> Claim:
        """Reserve up to ``limit`` pending requests that fit under the cap (see Store.claim)."""
        claim = await self.in_db(
            self.store.claim,
            self.runner_id,
            limit,
            url=url,
            model=model,
            batch=self.batch,
            scales=self.calibration.scales(),
            only=self.only,
        )
        self._books_seen(claim.spend)
        self.stats.cap_pico = claim.cap_pico
        if claim.budget is not None:
            self.stats.budget = claim.budget
        self.stats.budget_stop = claim.budget if claim.budget_blocked else None
        return claim

    async def over_budget(self, req: PendingRequest) -> bool:
        """Whether the budget period ``req`` draws on is past its limit now (an unknown outcome
        was charged while its reservation still stands): its retry must not be sent."""
        if self.stats.budget is None:
            return False
        books = await self.in_db(self.store.over_budget, req.id)
        if books is not None:
            self.stats.budget_stop = books
        return books is not None

    async def open_elsewhere(self, mine: int, *, batches: bool = False) -> int:
        """Requests of the job reserved by other runners (they may still come back), given
        that this runner holds ``mine``; with ``batches``, also those that open Batch API
        batches hold (a batch runner waits for them, a synchronous one cannot collect them)."""
        counts = await self.in_db(self.store.state_counts, self.job.id, (RequestState.RESERVED,))
        reserved = counts.get(RequestState.RESERVED, 0) - mine
        if batches:
            return reserved
        return reserved - await self.in_db(self.store.in_batches, self.job.id)

    # -- settling (in memory; the writer commits) ----------------------------------------------

    def attempt(
        self, req: PendingRequest, number: int, started: float, latency: float,
        status: int | None, kind: str | None,
    ) -> None:  # fmt: skip
        self.stats.attempts += 1
        self._out.attempts.append(
            AttemptRecord(req.id, number, started, int(latency * 1000), status, kind)
        )

    def succeed(
        self,
        req: PendingRequest,
        data: dict[str, Any],
        body: str,
        *,
        status: int = 200,
        api_request_id: str | None = None,
        latency: float = 0.0,
    ) -> None:
        """A result: book its actual cost from its usage (or its worst case, flagged, when the
        response carried no readable usage)."""
        endpoint = endpoint_for(req.url)
        usage = endpoint.read_usage(data) if endpoint is not None else None
        flags: list[ResultFlag] = [ResultFlag.BATCH] if self.batch else []
        bill = self._cost(req, usage, endpoint, data)
        cost = bill.pico if bill is not None else None
        if usage is None or not usage.complete or bill is None or cost is None:
            cost = req.worst_pico
            flags.append(ResultFlag.USAGE_MISSING)
            self.stats.usage_missing += 1
            usage = usage or Usage(None, 0, 0, 0, 0, complete=False)
        elif not bill.priced:
            # Its real price is unknown: its worst case, never less than its usage at the
            # requested model's (and tier's) prices.
            cost = max(cost, req.worst_pico)
            flags.append(
                ResultFlag.UNPRICED_MODEL if bill.unpriced_model else ResultFlag.UNPRICED_TIER
            )
            self._unpriced(req, bill, cost)
        elif bill.tier == "flex":
            flags.append(ResultFlag.FLEX)  # served and billed at flex: the flex lane
        ratio = self._learn(req, usage, endpoint) if ResultFlag.USAGE_MISSING not in flags else 0
        if cost > req.worst_pico:
            flags.append(ResultFlag.OVER_RESERVATION)
            self._overrun(req, cost, ratio)
        invalid = self._invalid_output(req, data) if endpoint is not None else None
        if invalid is not None:
            flags.append(invalid[0])
        stats = self.stats
        stats.done += 1
        stats.input_tokens += usage.input_tokens
        stats.output_tokens += usage.output_tokens
        stats.settled_pico += cost
        stats.reserved_pico -= req.worst_pico
        self._out.results.append(
            ResultRecord(
                request_id=req.id,
                state=RequestState.DONE,
                attempts=req.attempts,
                status_code=status,
                body=redact(body),
                response_model=usage.model,
                api_request_id=api_request_id,
                prompt_tokens=usage.input_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.output_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost_pico=cost,
                latency_ms=int(latency * 1000),
                finished_at=time.time(),
                reserved_pico=req.worst_pico,
                error_code=invalid[0].value if invalid is not None else None,
                error_message=invalid[1] if invalid is not None else None,
                flags=tuple(flags),
            )
        )
        self._wrote()

    def _invalid_output(
        self, req: PendingRequest, data: Mapping[str, Any]
    ) -> tuple[ResultFlag, str] | None:
        """Whether the output is not the JSON the request asked for (``structured.check``):
        the flag and a short reason; the first of each kind is said while the run goes on."""
        checked = structured.check(req.url, req.body, data)
        if checked is None:
            return None
        flag, reason = ResultFlag(checked[0]), redact(checked[1])
        counts = self.stats.invalid_outputs
        counts[flag.value] = counts.get(flag.value, 0) + 1
        if counts[flag.value] == 1:
            what = (
                "is not the JSON it asked for"
                if flag is ResultFlag.OUTPUT_NOT_JSON
                else "does not match the JSON schema it asked for"
            )
            self.notice(
                f"request {req.custom_id!r}: its output {what} ({reason}); kept as a result "
                "(it was billed), `status` counts such outputs"
            )
        return flag, reason

    def _cost(
        self,
        req: PendingRequest,
        usage: Usage | None,
        endpoint: Endpoint | None,
        data: Mapping[str, Any],
    ) -> Bill | None:
        """The result's bill: by the model the response names and the service tier it reports
        (the request's own when it reports none). None: book the worst case."""
        if usage is None or not usage.complete:
            return None
        reported = data.get("service_tier")
        try:
            bill = self.table.settle(
                req.model,
                usage,
                endpoint=endpoint,
                batch=self.batch,
                tier=reported if isinstance(reported, str) else None,
                asked=tier_of_json(req.body),
            )
        except BatchrunError:
            return None
        return bill if bill.pico < 2**62 else None  # nonsense usage: book the worst case

    def _unpriced(self, req: PendingRequest, bill: Bill, cost: int) -> None:
        """A response the price table cannot price: say so once per name, count it (``status``
        shows them), and with --strict-models stop the run in order."""
        if bill.unpriced_model:
            name, what = bill.unpriced_model, f"was answered by model {bill.unpriced_model!r}"
        else:
            name = f"service tier {bill.unpriced_tier}"
            what = f"was served at service tier {bill.unpriced_tier!r}"
        counts = self.stats.unpriced
        first = name not in counts
        counts[name] = counts.get(name, 0) + 1
        text = (
            f"request {req.custom_id!r} ({req.model}) {what}, which the price table has no "
            f"prices for: booked at its worst case, {format_usd(cost)}"
        )
        if first:
            self.event("unpriced", detail=f"{req.custom_id}: {name}")
            more = "" if self.strict_models else "; `status` counts such results"
            self.notice(text + more)
        if self.strict_models:
            self._flush_now.set()
            self.control.stop(
                RunOutcome.UNPRICED,
                f"{text}; sending stopped (--strict-models). Add its prices to a price file "
                "(--prices) to run on",
            )

    def _learn(self, req: PendingRequest, usage: Usage, endpoint: Endpoint | None) -> int:
        """Calibrate on one result; its own largest billed/expected ratio (ppm)."""
        if req.unbounded:
            return 0  # earlier turns billed as input: nothing to learn about counting
        price = self.table.lookup(req.model)
        expected = price.expected_input(req.input_tokens) if price else req.input_tokens
        has_output = endpoint is None or endpoint.has_output
        before = self.calibration.scale(req.model)
        ratio = self.calibration.learn(
            req.model,
            expected_input=expected,
            output_limit=req.output_limit if has_output else 0,
            billed_input=usage.input_tokens,
            billed_output=usage.output_tokens if has_output else 0,
        )
        after = self.calibration.scale(req.model)
        if after > before and after > self._told_scale.get(req.model, PPM):
            self._told_scale[req.model] = after
            cal = self.calibration.models[req.model]
            self.event("calibrated", detail=f"{req.model}: reserving {after} ppm")
            self.notice(
                f"{cal.describe(req.model) or req.model}; the requests still to send are "
                f"reserved at {after / PPM:.2f}x their worst case, so the cap keeps holding"
            )
        return ratio

    def _overrun(self, req: PendingRequest, cost: int, ratio: int) -> None:
        """A response cost more than its reserved worst case. An allowed unbounded request, or
        a server that counts tokens its own way (a ratio calibration can take, with room under
        the cap for what it cost), only holds dispatch until what is in flight has settled and
        the cap is checked again at the calibrated scale. A ratio no calibration is honest
        about (earlier turns billed as input), or an overrun the cap has no room for, stops
        the run."""
        extra = cost - req.worst_pico
        stats = self.stats
        stats.overruns += 1
        stats.overrun_pico += extra
        self.event("overrun", detail=f"{req.custom_id}: {extra} pico over its worst case")
        self._flush_now.set()
        if req.unbounded and self.allow_unbounded:
            self.recheck = True
            self.notice(
                f"request {req.custom_id!r} cost {format_usd(extra)} more than its reserved "
                "worst case; checking the cap before sending more"
            )
            return
        books_after = stats.settled_pico + cost + stats.reserved_pico - req.worst_pico
        if self.calibration.honest(ratio) and books_after <= stats.cap_pico:
            self.recheck = True
            return
        why = (
            f"it was billed {ratio / PPM:,.1f}x what batchrun counted and allowed, more than "
            f"{self.calibration.settings.most:g}x (a server that bills past the output limits, "
            "or a request carrying earlier turns)"
            if not self.calibration.honest(ratio)
            else "the cap has no room left for it"
        )
        self.control.stop(
            RunOutcome.OVERRUN,
            f"request {req.custom_id!r} cost {format_usd(extra)} more than its reserved worst "
            f"case and {why}; sending stopped so the cap holds",
        )

    def fail(
        self,
        req: PendingRequest,
        *,
        status: int | None,
        body: bytes | str | None,
        code: str | None,
        message: str | None,
        api_request_id: str | None = None,
        latency: float = 0.0,
    ) -> None:
        """The request failed for good: nothing billed, the reservation is freed."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        self.stats.failed += 1
        self.stats.reserved_pico -= req.worst_pico
        self._out.results.append(
            ResultRecord(
                request_id=req.id,
                state=RequestState.FAILED,
                attempts=req.attempts,
                status_code=status,
                body=redact(text) if text else None,
                response_model=None,
                api_request_id=api_request_id,
                prompt_tokens=0,
                cached_tokens=0,
                completion_tokens=0,
                reasoning_tokens=0,
                cost_pico=0,
                latency_ms=int(latency * 1000),
                finished_at=time.time(),
                reserved_pico=req.worst_pico,
                error_code=redact(code) if code else None,
                error_message=redact(message) if message else None,
                flags=(ResultFlag.BATCH,) if self.batch else (),
            )
        )
        self._wrote()

    def charge_unknown(self, req: PendingRequest) -> None:
        """The request may have been billed and we cannot know for how much: its worst case."""
        self.stats.settled_pico += req.worst_pico
        self.stats.unknown_charges += 1
        self._out.charges.append(ChargeRecord(req.id, req.worst_pico, time.time()))
        self._flush_now.set()

    def release(self, req: PendingRequest, message: str | None = None) -> None:
        """Hand the reservation back: the request goes back to pending for a later try."""
        self.stats.reserved_pico -= req.worst_pico
        self._out.releases.append(
            ReleaseRecord(
                req.id, req.attempts, redact(message) if message else None, req.worst_pico
            )
        )
        self._wrote()

    def event(self, kind: str, seconds: float = 0.0, detail: str | None = None) -> None:
        self._out.events.append(EventRecord(time.time(), kind, seconds, detail))

    def share_pause(self, seconds: float) -> None:
        """Tell the job's other runners (through the database) to hold their requests for
        ``seconds`` too: a 429 says the organization's limit is exhausted, not this runner's.
        Does not wait for the write; many workers meeting the same 429 write it once."""
        until = time.time() + seconds
        if until <= self._shared_until + 0.05 or self._closing:
            return
        self._shared_until = until
        task = asyncio.ensure_future(self._share_pause(until))
        self._sharing.add(task)
        task.add_done_callback(self._sharing.discard)

    async def _share_pause(self, until: float) -> None:
        with contextlib.suppress(BatchrunError):  # best effort: the others meet the 429 too
            await self._in_beats(self.store.share_pause, self.job.id, until)

    def notice(self, text: str) -> None:
        """Something the user should read while the run goes on."""
        self.stats.notices.append(text)

    def _wrote(self) -> None:
        self._settled.set()
        if self._out.rows() >= self.writer_settings.rows:
            self._flush_now.set()

    # -- the writer -----------------------------------------------------------------------------

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        """Group commit: every ``interval``, or sooner when many outcomes wait."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.writer_settings.interval):
                    await self._flush_now.wait()
            self._flush_now.clear()
            try:
                await self.flush()
            except BatchrunError as exc:
                self.control.stop(RunOutcome.STORE_ERROR, str(exc))
                self.control.hard.set()
                return

    async def flush(self) -> Spend | None:
        """Commit what is waiting: when this returns, everything recorded before the call is
        durable, also what a commit already under way (the writer's) had taken. The job's
        books as the store has them afterwards; None when there was nothing to commit."""
        waited = self._committing.locked()
        async with self._committing:
            if not self._out:
                return self._spend if waited else None
            out, self._out = self._out, Outcomes()
            spend = await self.in_db(self.store.record, self.runner_id, out)
            self._spend = spend
        self._books_seen(spend)
        if spend.settled_pico > self.stats.cap_pico and not self.control.stopping:
            self.control.stop(
                RunOutcome.CAPPED,
                "spend reached the cap (unknown outcomes are charged at their worst case)",
            )
        return spend

    async def close(self) -> None:
        """Stop the writer and commit everything left (also after a hard stop)."""
        self._closing = True
        self._flush_now.set()
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        try:
            if self._sharing:
                await asyncio.gather(*self._sharing, return_exceptions=True)
            await self.flush()
        finally:
            self._db.shutdown(wait=True)
            self._beats.shutdown(wait=True)

    # -- runners ------------------------------------------------------------------------------

    async def beat(self, ttl: float) -> Beat:
        """Renew this runner's heartbeat; take over the claims of runners that died."""
        beat = await self._in_beats(self.store.heartbeat, self.runner_id, ttl, self.stats.in_flight)
        if beat.alive:
            await self._in_beats(self.store.recover, self.job.id, self.host, process_alive)
        return beat


class Engine:
    """Runs one backend over one job's books until it finishes or is stopped."""

    def __init__(
        self, books: Books, backend: Backend, control: Control, stopping: Stopping
    ) -> None:
        self.books = books
        self.backend = backend
        self.control = control
        self.stopping = stopping

    @property
    def stats(self) -> RunStats:
        return self.books.stats

    async def run(self) -> RunReport:
        books, control = self.books, self.control
        books.start()
        beats = asyncio.create_task(self._heartbeat())
        work = asyncio.create_task(self.backend.run(books, control))
        hard = asyncio.create_task(control.hard.wait())
        result: RunOutcome | None = None
        try:
            await asyncio.wait({work, hard}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
            try:
                result = await work
            except asyncio.CancelledError:
                pass
            except BatchrunError as exc:  # the store failed: nothing more can be booked
                control.stop(RunOutcome.STORE_ERROR, str(exc))
                control.hard.set()
        finally:
            for task in (hard, beats):
                task.cancel()
            await asyncio.gather(hard, beats, return_exceptions=True)
            try:
                await books.close()
            except BatchrunError as exc:
                control.stop(RunOutcome.STORE_ERROR, str(exc))
        outcome = control.outcome or result or RunOutcome.COMPLETE
        return RunReport(outcome, self.stats, control.message, control.signal)

    async def _heartbeat(self) -> None:
        ttl = self.stopping.heartbeat_ttl
        # Twice a second at most: a pause another runner shared, or a runner joining or
        # leaving, reaches this one within a second (a beat plus its transaction).
        period = min(ttl / 3, 0.5)
        while True:
            # The first beat comes at once: the runner learns its share of the rate limits (and
            # any pause another runner met) before it sends much.
            try:
                beat = await self.books.beat(ttl)
            except BatchrunError:
                beat = None  # a missed beat is retried; expiry leaves slack
            if beat is not None and not beat.alive:
                self.control.stop(
                    RunOutcome.STORE_ERROR,
                    "another batchrun process declared this one dead (it missed its heartbeat)"
                    " and took over its requests",
                )
                self.control.hard.set()
                return
            if beat is not None:
                self.backend.on_beat(beat)
            await asyncio.sleep(period)
