"""The books: one runner's side of a job's money.

- ``Books.claim`` reserves requests in file order, each only while settled spend + open
  reservations + its worst case fit under the cap (checked by the store, under a lock, across
  every runner of the job);
- ``Books.succeed`` / ``fail`` / ``charge_unknown`` / ``release`` settle them in memory, priced
  by what the response reports, and calibrate the reservations on what the server billed; the
  group-commit writer (``GroupWriter``) makes them durable;
- ``Chunks`` keeps the Batch API backend's chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .. import structured
from ..calibration import PPM, Calibration, ModelCalibration
from ..clock import SYSTEM, Clock
from ..endpoints import Endpoint, Usage, endpoint_for
from ..errors import BatchrunError
from ..money import format_usd
from ..pricing import Bill, PriceTable, tier_of_json
from ..redact import redact
from ..settings import Calibrating, Writer
from ..store import (
    AttemptRecord,
    ChargeRecord,
    Claim,
    EventRecord,
    Job,
    PendingRequest,
    ReleaseRecord,
    RequestState,
    ResultFlag,
    ResultRecord,
    Spend,
    Store,
)
from ..store.records import BatchInfo
from ._control import Control, RunOutcome, RunStats
from ._membership import Membership
from ._writer import GroupWriter

T = TypeVar("T")


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
        clock: Clock = SYSTEM,
        members: Membership | None = None,
    ) -> None:
        self.store = store
        self.job = job
        self.runner_id = runner_id
        self.table = table
        self.control = control
        self.clock = clock
        self.batch = batch  # settle at Batch API prices
        self.allow_unbounded = allow_unbounded
        self.only = only  # claim only these requests (by sequence number): a sample
        self.strict_models = strict_models  # stop at a response the table cannot price
        self.writer_settings = writer or Writer()
        self.stats = RunStats(started=clock.monotonic(), cap_pico=job.cap_pico)
        # What the job's results so far taught about how the server counts tokens: the
        # requests still to send are reserved at that scale of their worst case.
        self.calibration = Calibration(calibrating)
        self.calibration.seed({m: self._against_factor(m, cal) for m, cal in (seen or {}).items()})
        self._told_scale: dict[str, int] = {}
        self.writer = GroupWriter(
            store,
            runner_id,
            self.writer_settings,
            on_commit=self._committed,
            on_failure=self._store_failed,
        )
        self.members = members or Membership(store, job.id, runner_id, clock)
        self.chunks = Chunks(self)
        self._settled = asyncio.Event()  # something settled or was released
        # Set when an allowed unbounded request cost more than its worst case: send nothing
        # new until what is in flight has settled and the cap is checked against the books.
        self.recheck = False

    def lane(self, *, batch: bool, only: frozenset[int] | None = None) -> Books:
        """Books of the same runner and job for another lane (``--via auto``: the Batch API's
        requests are claimed and settled at batch prices, the synchronous ones at standard
        prices): the same store, control, counters, calibration and membership, a writer of
        its own."""
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
            clock=self.clock,
            members=self.members,
        )
        other.stats = self.stats
        other.calibration = self.calibration
        return other

    # -- plumbing -------------------------------------------------------------------------------

    async def in_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the writer's thread."""
        return await self.writer.call(fn, *args, **kwargs)

    async def counts(self, states: tuple[RequestState, ...]) -> dict[RequestState, int]:
        """How many of the job's requests are in each of ``states``."""
        return await self.in_db(self.store.state_counts, self.job.id, states)

    async def open_by_model(self) -> dict[str, tuple[int, int, int]]:
        """The job's requests not yet finished that ask for no service tier of their own, by
        model: (requests, input tokens, output limit tokens)."""
        return await self.in_db(self.store.open_by_model, self.job.id)

    async def last_event(self, kind: str) -> tuple[float, str | None] | None:
        """(when, detail) of the job's latest event of ``kind`` (any runner's, any run's)."""
        return await self.in_db(self.store.last_event, self.job.id, kind)

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
        counts = await self.counts((RequestState.RESERVED,))
        reserved = counts.get(RequestState.RESERVED, 0) - mine
        if batches:
            return reserved
        return reserved - await self.chunks.in_batches()

    # -- settling (in memory; the writer commits) ----------------------------------------------

    def attempt(
        self, req: PendingRequest, number: int, started: float, latency: float,
        status: int | None, kind: str | None,
    ) -> None:  # fmt: skip
        self.stats.attempts += 1
        self.writer.out.attempts.append(
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
        self.writer.out.results.append(
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
                finished_at=self.clock.now(),
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
            self.writer.soon()
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
        self.writer.soon()
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
        self.writer.out.results.append(
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
                finished_at=self.clock.now(),
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
        self.writer.out.charges.append(ChargeRecord(req.id, req.worst_pico, self.clock.now()))
        self.writer.soon()

    def release(self, req: PendingRequest, message: str | None = None) -> None:
        """Hand the reservation back: the request goes back to pending for a later try."""
        self.stats.reserved_pico -= req.worst_pico
        self.writer.out.releases.append(
            ReleaseRecord(
                req.id, req.attempts, redact(message) if message else None, req.worst_pico
            )
        )
        self._wrote()

    def event(self, kind: str, seconds: float = 0.0, detail: str | None = None) -> None:
        self.writer.out.events.append(EventRecord(self.clock.now(), kind, seconds, detail))

    def notice(self, text: str) -> None:
        """Something the user should read while the run goes on."""
        self.stats.notices.append(text)

    def _wrote(self) -> None:
        self._settled.set()
        self.writer.wrote()

    # -- commits --------------------------------------------------------------------------------

    def start(self) -> None:
        self.writer.start()

    async def flush(self) -> Spend | None:
        """Make everything recorded so far durable (see ``GroupWriter.flush``); the job's books
        as the store has them afterwards, None when there was nothing to commit."""
        return await self.writer.flush()

    def _committed(self, spend: Spend) -> None:
        self._books_seen(spend)
        if spend.settled_pico > self.stats.cap_pico and not self.control.stopping:
            self.control.stop(
                RunOutcome.CAPPED,
                "spend reached the cap (unknown outcomes are charged at their worst case)",
            )

    def _store_failed(self, message: str) -> None:
        self.control.stop(RunOutcome.STORE_ERROR, message)
        self.control.hard.set()

    async def close(self) -> None:
        """Commit everything left (also after a hard stop) and let the threads go."""
        try:
            await self.writer.close()
        finally:
            await self.members.close()


class Chunks:
    """The job's Batch API chunks as one runner keeps them: the store's rows, written on the
    books' thread, so the batch backend speaks to the Batch API and to its books, never to the
    store."""

    def __init__(self, books: Books) -> None:
        self._books = books

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._books.in_db(fn, *args, **kwargs)

    async def open(self, request_ids: list[int], **values: Any) -> BatchInfo:
        """Record a chunk of claimed requests before its batch is created (``Store.open_chunk``)."""
        books = self._books
        return await self._call(books.store.open_chunk, books.runner_id, request_ids, **values)

    async def update(self, chunk_id: int, **values: Any) -> None:
        await self._call(self._books.store.update_chunk, self._books.runner_id, chunk_id, **values)

    async def close(self, chunk_id: int, **values: Any) -> None:
        """The chunk's batch has ended and every line of it is recorded."""
        await self._call(self._books.store.close_chunk, self._books.runner_id, chunk_id, **values)

    async def abandon(self, chunk_id: int, reason: str) -> int:
        """Its batch was never created: hand its requests back; how many."""
        books = self._books
        return await self._call(books.store.abandon_chunk, books.runner_id, chunk_id, reason)

    async def attach(self) -> list[BatchInfo]:
        """Take over the job's open chunks that no live runner watches."""
        return await self._call(self._books.store.attach_chunks, self._books.runner_id)

    async def requests(self, chunk_id: int) -> list[PendingRequest]:
        """The chunk's requests still waiting for a result."""
        return await self._call(self._books.store.chunk_requests, chunk_id)

    async def by_tag(self, tag: str) -> BatchInfo | None:
        return await self._call(self._books.store.chunk_by_tag, tag)

    async def in_batches(self) -> int:
        """The job's requests that open batches hold."""
        return await self._call(self._books.store.in_batches, self._books.job.id)
