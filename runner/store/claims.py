"""Runners, claims and the books: how requests are held against the cap and settled.

Money invariants kept here, each in one transaction:

- a request is claimed (``reserved``, its worst case added to the job's ``reserved_pico``)
  *before* it may be sent, and only while settled + reserved + its worst case <= the job's cap;
  the check and the claim happen under a lock on the job's row, so two runners can never both
  fit under the same headroom;
- a finished request's actual cost is a ``result`` row in the ledger, written with its result,
  and its reservation is dropped in the same transaction;
- a request whose fate is unknown (sent, then a timeout, or its runner died) is charged its
  worst case as an ``unknown`` ledger row, so recorded spend is never below what was billed.

Every runner registers and keeps a heartbeat; its claims and writes are fenced on its own row,
so a runner declared dead (and whose claims another runner recovered) can write nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..calibration import scaled
from ..errors import RunnerLostError
from .base import (
    AmbiguousCommitError,
    DisconnectedError,
    StoreBase,
    idempotent,
    retry_conflicts,
)
from .budgets import Deltas, add, hold_budget, move_budgets, tags_of
from .reads import Sharing
from .records import (
    Beat,
    Claim,
    Outcomes,
    PendingRequest,
    RequestState,
    ResultRecord,
    Spend,
)
from .schema import attempts, events, jobs, ledger, requests, results, runners

LIVE, STOPPED, DEAD = "live", "stopped", "dead"

_PENDING_COLUMNS = (
    requests.c.id,
    requests.c.seq,
    requests.c.custom_id,
    requests.c.url,
    requests.c.model,
    requests.c.body,
    requests.c.input_tokens,
    requests.c.output_limit,
    requests.c.worst_pico,
    requests.c.batch_worst_pico,
    requests.c.attempts,
    requests.c.line,
    requests.c.unbounded,
)


def _books(conn: Connection, job_id: int) -> tuple[Spend, int]:
    """The job's books, its row locked until the transaction ends (FOR NO KEY UPDATE on
    PostgreSQL: it serializes claims and settlements, not inserts that merely reference it)."""
    row = conn.execute(
        sa.select(jobs.c.settled_pico, jobs.c.reserved_pico, jobs.c.cap_pico)
        .where(jobs.c.id == job_id)
        .with_for_update(key_share=True)
    ).one()
    return Spend(int(row.settled_pico), int(row.reserved_pico)), int(row.cap_pico)


def _move_books(conn: Connection, job_id: int, settled: int, reserved: int) -> Spend:
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == job_id)
        .values(
            settled_pico=jobs.c.settled_pico + settled,
            reserved_pico=jobs.c.reserved_pico + reserved,
        )
        .returning(jobs.c.settled_pico, jobs.c.reserved_pico)
    ).one()
    return Spend(int(row.settled_pico), int(row.reserved_pico))


def _flags(r: ResultRecord) -> str | None:
    return ",".join(r.flags) if r.flags else None


class ClaimsMixin(StoreBase):
    # -- runners ------------------------------------------------------------------------------
    # Times that runners compare with each other (heartbeats, expiry, a shared pause) come from
    # the database's clock, so runners on machines whose clocks disagree still agree.

    @retry_conflicts
    def register_runner(
        self, job_id: int, host: str, pid: int, via: str, ttl: float, budget_id: int | None = None
    ) -> int:
        """Register a runner of the job; its claims draw on ``budget_id`` (if any) too."""
        with self.writing() as conn:
            now = self.wall_clock(conn)
            return int(
                conn.execute(
                    runners.insert().values(
                        job_id=job_id,
                        host=host,
                        pid=pid,
                        via=via,
                        started_at=now,
                        heartbeat_at=now,
                        expires_at=now + ttl,
                        state=LIVE,
                        budget_id=budget_id,
                    )
                ).inserted_primary_key[0]
            )

    def _fence(self, conn: Connection, runner_id: int) -> int:
        """Lock this runner's row; refuse if it was declared dead. Returns its job id."""
        return int(self._fence_row(conn, runner_id).job_id)

    def _fence_row(self, conn: Connection, runner_id: int) -> Any:
        """``_fence``, returning the runner's row (its job and its budget)."""
        row = conn.execute(
            sa.select(runners.c.state, runners.c.job_id, runners.c.budget_id)
            .where(runners.c.id == runner_id)
            .with_for_update()
        ).first()
        if row is None or row.state != LIVE:
            raise RunnerLostError(
                f"{self.name}: this runner (#{runner_id}) stopped renewing its heartbeat in time "
                "(was it suspended?) and another batchrun process took over its requests; it "
                "stops here, and what it had in flight was charged at worst case"
            )
        return row

    @retry_conflicts
    @idempotent  # run twice, it changes nothing more
    def heartbeat(self, runner_id: int, ttl: float, in_flight: int) -> Beat:
        """Renew this runner's claim on life; learn the live runners, how many of them share
        the rate limits now, and any shared pause."""
        with self.writing() as conn:
            now = self.wall_clock(conn)
            n = conn.execute(
                runners.update()
                .where(runners.c.id == runner_id, runners.c.state == LIVE)
                .values(heartbeat_at=now, expires_at=now + ttl, in_flight=in_flight)
            ).rowcount
            job_id = conn.execute(
                sa.select(runners.c.job_id).where(runners.c.id == runner_id)
            ).scalar()
            sharing = Sharing(conn, job_id)
            paused = conn.execute(
                sa.select(jobs.c.paused_until).where(jobs.c.id == job_id)
            ).scalar()
        # The pause on this machine's clock: the same number of seconds from now.
        paused_until = self.now() + (float(paused) - now) if paused and paused > now else 0.0
        return Beat(
            alive=n == 1,
            live_runners=sharing.live,
            paused_until=paused_until,
            share=sharing.share(runner_id),
            others_sending=len(sharing.holding.keys() - {runner_id}),
        )

    @retry_conflicts
    @idempotent  # run twice, it changes nothing more
    def retire_runner(self, runner_id: int) -> None:
        """This runner stops: it holds no claims any more (the engine handed them back)."""
        with self.writing() as conn:
            conn.execute(
                runners.update()
                .where(runners.c.id == runner_id, runners.c.state == LIVE)
                .values(state=STOPPED, in_flight=0, heartbeat_at=self.wall_clock(conn))
            )

    @retry_conflicts
    @idempotent  # run twice, it changes nothing more
    def share_pause(self, job_id: int, until: float) -> None:
        """Tell every runner of the job to hold its requests until ``until`` (epoch seconds on
        this machine's clock; stored on the database's)."""
        seconds = until - self.now()
        if seconds <= 0:
            return
        with self.writing() as conn:
            until_db = self.wall_clock(conn) + seconds
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.paused_until < until_db)
                .values(paused_until=until_db)
            )

    @retry_conflicts
    @idempotent  # run twice, it changes nothing more
    def recover(
        self, job_id: int, host: str, process_alive: Callable[[int], bool]
    ) -> tuple[int, int]:
        """Declare dead the job's runners whose heartbeat expired (or, on this host, whose
        process is gone), charge their claims at worst case (their fate is unknown) and queue
        them again. Also recovers claims no live runner holds. Returns (requests, pico)
        charged; a Batch API runner's claims that never reached a chunk go back uncharged.

        Several runners may recover at once (PostgreSQL): a runner is declared dead by one
        guarded update, and the claims taken back are those whose runner is not live when the
        statement runs, locked, so each is charged once and a runner that registered meanwhile
        keeps its own.
        """
        with self.writing() as conn:
            now = self.wall_clock(conn)
            live = conn.execute(
                sa.select(runners.c.id, runners.c.host, runners.c.pid, runners.c.expires_at)
                .where(runners.c.job_id == job_id, runners.c.state == LIVE)
                .order_by(runners.c.id)
            ).all()
            dead = [
                r.id
                for r in live
                if r.expires_at < now or (r.host == host and not process_alive(r.pid))
            ]
            if dead:
                conn.execute(
                    runners.update()
                    .where(runners.c.id.in_(dead), runners.c.state == LIVE)
                    .values(state=DEAD, in_flight=0)
                )
            still_live = sa.select(runners.c.id).where(
                runners.c.job_id == job_id, runners.c.state == LIVE
            )
            via = (
                sa.select(runners.c.via)
                .where(runners.c.id == requests.c.runner_id)
                .scalar_subquery()
                .label("via")
            )
            rows = conn.execute(
                sa.select(
                    requests.c.id,
                    requests.c.reserved_pico,
                    via,
                    requests.c.budget_id,
                    requests.c.budget_period,
                )
                .where(
                    requests.c.job_id == job_id,
                    requests.c.state == RequestState.RESERVED,
                    # Requests an open Batch API batch holds (no runner, a chunk) are the
                    # batch's: it may still run at OpenAI, so they are re-attached, never
                    # re-queued.
                    sa.or_(requests.c.runner_id.is_not(None), requests.c.chunk_id.is_(None)),
                    sa.or_(
                        requests.c.runner_id.is_(None),
                        requests.c.runner_id.not_in(still_live.scalar_subquery()),
                    ),
                )
                .order_by(requests.c.id)
                .with_for_update()
            ).all()
            if not rows:
                return 0, 0
            # A Batch API runner sends a request only in a recorded chunk's file: what it
            # claimed but never handed to a chunk was never sent, so it goes back uncharged.
            unknown = [r for r in rows if r.via != "batch"]
            deltas: Deltas = {}
            for r in rows:
                held = int(r.reserved_pico)
                charged = held if r.via != "batch" else 0
                add(deltas, _tag(r), charged, -held, charged)
            if unknown:
                self.dialect.insert_many(
                    conn,
                    ledger,
                    _LEDGER_COLUMNS,
                    [
                        (job_id, r.id, "unknown", r.reserved_pico, now, r.budget_id,
                         r.budget_period)
                        for r in unknown
                    ],
                )  # fmt: skip
            self.dialect.update_many(
                conn,
                requests,
                ("id", "state"),
                [(r.id, RequestState.PENDING.value) for r in rows],
                {"reserved_pico": 0, "runner_id": None},
            )
            charged = sum(int(r.reserved_pico) for r in unknown)
            _move_books(conn, job_id, charged, -sum(int(r.reserved_pico) for r in rows))
            move_budgets(conn, deltas)
        return len(unknown), charged

    # -- claims -------------------------------------------------------------------------------

    @retry_conflicts
    def claim(
        self,
        runner_id: int,
        limit: int,
        *,
        url: str | None = None,
        model: str | None = None,
        batch: bool = False,
        scales: Mapping[str, int] | None = None,
        only: Collection[int] | None = None,
    ) -> Claim:
        """Reserve up to ``limit`` pending requests, in file order, that fit under the cap.

        ``batch`` reserves their worst case at Batch API prices; ``scales`` (model -> parts
        per million) reserves a model's at that multiple of it (see ``calibration``).
        ``url``/``model`` restrict the claim to one endpoint or model (a Batch API file holds
        one of each); ``only`` to these sequence numbers (a sample).
        """
        draft = _Draft()
        try:
            return self._claim_once(runner_id, limit, url, model, batch, scales or {}, only, draft)
        except AmbiguousCommitError:
            # Cut off in its COMMIT: if it was written, the first request it took is held by
            # this runner now (a claim commits whole); else it runs again, as after a
            # connection lost before the COMMIT.
            if not draft.taken or not self._holds(runner_id, draft.taken[0].id):
                raise DisconnectedError(f"{self.name}: a claim's COMMIT was cut off") from None
            spend, cap = self.books(draft.job_id)
            return Claim(
                requests=draft.taken,
                spend=spend,
                cap_pico=cap,
                blocked=len(draft.taken) < draft.rows,
                exhausted=False,
            )

    @retry_conflicts
    def _holds(self, runner_id: int, request_id: int) -> bool:
        """Whether this live runner holds ``request_id``: how a transaction whose COMMIT lost
        its connection is known to have been written or not (it commits whole, and nobody
        else takes a live runner's requests). Raises RunnerLostError if it was taken over."""
        with self.writing() as conn:
            self._fence(conn, runner_id)
            row = conn.execute(
                sa.select(requests.c.state, requests.c.runner_id).where(requests.c.id == request_id)
            ).one()
        return row.state == RequestState.RESERVED and row.runner_id == runner_id

    def _claim_once(
        self,
        runner_id: int,
        limit: int,
        url: str | None,
        model: str | None,
        batch: bool,
        scales: Mapping[str, int],
        only: Collection[int] | None,
        draft: _Draft,
    ) -> Claim:
        """One claim transaction; ``draft`` holds what it takes, for a caller whose COMMIT was
        cut off to look up."""
        taken = draft.taken
        budget = None
        budget_blocked = False
        with self.writing() as conn:
            fenced = self._fence_row(conn, runner_id)
            job_id = draft.job_id = int(fenced.job_id)
            spend, cap = _books(conn, job_id)
            where = [requests.c.job_id == job_id, requests.c.state == RequestState.PENDING]
            if url is not None:
                where.append(requests.c.url == url)
            if model is not None:
                where.append(requests.c.model == model)
            if only is not None:
                where.append(requests.c.seq.in_(sorted(only)))
            rows = conn.execute(
                sa.select(*_PENDING_COLUMNS)
                .where(*where)
                .order_by(requests.c.seq)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            draft.rows = len(rows)
            room = cap - spend.total_pico
            # The budget's room, checked with the cap's, under the budget's lock (taken last).
            if rows and fenced.budget_id is not None:
                budget = hold_budget(conn, int(fenced.budget_id), self.wall_clock(conn))
            left = budget.left_pico if budget is not None else 0
            for r in rows:
                worst = int(r.batch_worst_pico if batch else r.worst_pico)
                if r.model in scales:
                    worst = scaled(worst, scales[r.model])
                if worst > room:
                    break
                if budget is not None and worst > left:
                    budget_blocked = True
                    break
                room -= worst
                left -= worst
                taken.append(
                    PendingRequest(
                        id=r.id,
                        seq=r.seq,
                        custom_id=r.custom_id,
                        url=r.url,
                        model=r.model,
                        body=r.body,
                        input_tokens=r.input_tokens,
                        output_limit=r.output_limit,
                        worst_pico=worst,
                        attempts=r.attempts,
                        line=r.line,
                        unbounded=bool(r.unbounded),
                    )
                )
            if taken:
                tag = {"budget_id": None, "budget_period": None}
                if budget is not None:
                    tag = {"budget_id": budget.budget.id, "budget_period": budget.period.start}
                self.dialect.update_many(
                    conn,
                    requests,
                    ("id", "reserved_pico"),
                    [(r.id, r.worst_pico) for r in taken],
                    {"state": RequestState.RESERVED.value, "runner_id": runner_id, **tag},
                )
                held = sum(r.worst_pico for r in taken)
                spend = _move_books(conn, job_id, 0, held)
                if budget is not None:
                    move_budgets(conn, {(budget.budget.id, budget.period.start): [0, held, 0]})
                    budget = replace(budget, reserved_pico=budget.reserved_pico + held)
        return Claim(
            requests=taken,
            spend=spend,
            cap_pico=cap,
            blocked=len(taken) < len(rows),
            exhausted=not rows,
            budget=budget,
            budget_blocked=budget_blocked,
        )

    def books(self, job_id: int) -> tuple[Spend, int]:
        """The job's settled spend, open reservations and cap, as every runner sees them."""
        with self.reading() as conn:
            row = conn.execute(
                sa.select(jobs.c.settled_pico, jobs.c.reserved_pico, jobs.c.cap_pico).where(
                    jobs.c.id == job_id
                )
            ).one()
        return Spend(int(row.settled_pico), int(row.reserved_pico)), int(row.cap_pico)

    # -- outcomes -----------------------------------------------------------------------------

    def record(self, runner_id: int, out: Outcomes) -> Spend:
        """Write one group commit of outcomes in a single transaction; the job's books after.

        A row the database refuses (a value it cannot bind) must not cost the other rows their
        records: the commit is then split, and a result that still fails alone is kept without
        its body (its cost and state are what matter to the books).
        """
        try:
            return self._record_once(runner_id, out)
        except _BadRow:
            pass
        except AmbiguousCommitError:
            # A group commits whole: one request it settles or releases, still held, says it
            # was not written. A group without one cannot tell, and the run stops.
            marks = [r.request_id for r in out.results] + [r.request_id for r in out.releases]
            if not marks:
                raise
            if self._holds(runner_id, marks[0]):
                return self.record(runner_id, out)
            return self.books_of_runner(runner_id)
        rest = Outcomes(out.attempts, out.charges, [], out.releases, out.events)
        spend = self._record_once(runner_id, rest) if rest else self.books_of_runner(runner_id)
        for r in out.results:
            try:
                spend = self._record_once(runner_id, Outcomes(results=[r]))
            except _BadRow as exc:
                spend = self._record_once(runner_id, Outcomes(results=[_bare(r, exc.reason)]))
        return spend

    def books_of_runner(self, runner_id: int) -> Spend:
        with self.reading() as conn:
            job_id = conn.execute(
                sa.select(runners.c.job_id).where(runners.c.id == runner_id)
            ).scalar_one()
        return self.books(job_id)[0]

    @retry_conflicts
    def _record_once(self, runner_id: int, out: Outcomes) -> Spend:
        with self.writing() as conn:
            job_id = self._fence(conn, runner_id)
            try:
                return self._record(conn, job_id, runner_id, out)
            except (sa.exc.OperationalError, sa.exc.ResourceClosedError):
                raise  # the database itself failed: the caller stops
            except sa.exc.SQLAlchemyError as exc:
                raise _BadRow(str(getattr(exc, "orig", exc))[:200]) from None

    def _record(self, conn: Connection, job_id: int, runner_id: int, out: Outcomes) -> Spend:
        insert_many, update_many = self.dialect.insert_many, self.dialect.update_many
        settled = reserved = 0
        # Each request's cost is booked in the budget period it was reserved in.
        tags = tags_of(
            conn,
            [c.request_id for c in out.charges]
            + [r.request_id for r in out.results]
            + [r.request_id for r in out.releases],
        )
        deltas: Deltas = {}
        if out.attempts:
            insert_many(
                conn,
                attempts,
                _ATTEMPT_COLUMNS,
                [
                    (a.request_id, a.attempt, a.started_at, a.latency_ms, a.status_code,
                     a.error_kind)
                    for a in out.attempts
                ],
            )  # fmt: skip
        if out.charges:
            insert_many(
                conn,
                ledger,
                _LEDGER_COLUMNS,
                [
                    (
                        job_id,
                        c.request_id,
                        "unknown",
                        c.amount_pico,
                        c.at,
                        *_pair(tags, c.request_id),
                    )
                    for c in out.charges
                ],
            )
            settled += sum(c.amount_pico for c in out.charges)
            for c in out.charges:
                add(deltas, tags.get(c.request_id), c.amount_pico, 0, c.amount_pico)
        if out.results:
            insert_many(conn, results, _RESULT_COLUMNS, [_result_row(r) for r in out.results])
            billed = [r for r in out.results if r.cost_pico]
            if billed:
                insert_many(
                    conn,
                    ledger,
                    _LEDGER_COLUMNS,
                    [
                        (job_id, r.request_id, "result", r.cost_pico, r.finished_at,
                         *_pair(tags, r.request_id))
                        for r in billed
                    ],
                )  # fmt: skip
                settled += sum(r.cost_pico for r in billed)
            for r in out.results:
                add(deltas, tags.get(r.request_id), r.cost_pico, -r.reserved_pico, 0)
            update_many(
                conn,
                requests,
                ("id", "state", "attempts", "last_error"),
                [(r.request_id, str(r.state), r.attempts, r.error_message) for r in out.results],
                {"reserved_pico": 0, "runner_id": None},
            )
            reserved -= sum(r.reserved_pico for r in out.results)
        if out.releases:
            update_many(
                conn,
                requests,
                ("id", "attempts", "last_error"),
                [(r.request_id, r.attempts, r.last_error) for r in out.releases],
                {"state": RequestState.PENDING.value, "reserved_pico": 0, "runner_id": None},
            )
            reserved -= sum(r.reserved_pico for r in out.releases)
            for rel in out.releases:
                add(deltas, tags.get(rel.request_id), 0, -rel.reserved_pico, 0)
        if out.events:
            insert_many(
                conn,
                events,
                _EVENT_COLUMNS,
                [(job_id, runner_id, e.at, e.kind, e.seconds, e.detail) for e in out.events],
            )
        spend = _move_books(conn, job_id, settled, reserved)
        move_budgets(conn, deltas)  # after the job's row: the lock order claims keep
        return spend


@dataclass(slots=True)
class _Draft:
    """What a claim transaction took, kept outside it."""

    taken: list[PendingRequest] = field(default_factory=list)
    rows: int = 0
    job_id: int = 0


class _BadRow(Exception):
    """The database refused a value in one group commit (not the database failing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _bare(r: ResultRecord, reason: str) -> ResultRecord:
    """``r`` without the fields a database can refuse: its books and state stay exact."""
    return replace(
        r,
        body=None,
        response_model=None,
        api_request_id=None,
        error_code="unstorable",
        error_message=f"the response could not be stored ({reason})",
    )


_ATTEMPT_COLUMNS = (
    "request_id", "attempt", "started_at", "latency_ms", "status_code", "error_kind",
)  # fmt: skip
_LEDGER_COLUMNS = (
    "job_id",
    "request_id",
    "kind",
    "amount_pico",
    "at",
    "budget_id",
    "budget_period",
)


def _tag(row: Any) -> tuple[int, int] | None:
    return None if row.budget_id is None else (int(row.budget_id), int(row.budget_period))


def _pair(tags: Mapping[int, tuple[int, int]], request_id: int) -> tuple[int | None, int | None]:
    """A ledger row's budget columns: those of the request's reservation, or none."""
    return tags.get(request_id, (None, None))


_EVENT_COLUMNS = ("job_id", "runner_id", "at", "kind", "seconds", "detail")
_RESULT_COLUMNS = (
    "request_id", "status_code", "body", "response_model", "api_request_id", "prompt_tokens",
    "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_pico", "latency_ms",
    "finished_at", "error_code", "error_message", "flags",
)  # fmt: skip


def _result_row(r: ResultRecord) -> tuple[Any, ...]:
    return (
        r.request_id, r.status_code, r.body, r.response_model, r.api_request_id,
        r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.reasoning_tokens, r.cost_pico,
        r.latency_ms, r.finished_at, r.error_code, r.error_message, _flags(r),
    )  # fmt: skip
