"""Batch API batches: who owns the requests of a submitted batch, and what is known about it.

A batch is recorded in steps, each durable before the next happens at OpenAI:

1. ``open_chunk`` (before anything is uploaded): the chunk's row with a random tag, and its
   requests handed from the runner that claimed them to the chunk (``runner_id`` NULL,
   ``chunk_id`` set; still ``reserved`` at their batch worst case);
2. ``update_chunk`` with the uploaded file's id, then the batch's id as soon as ``create``
   returns (``state`` ``submitted``);
3. results settle the requests through ``Store.record`` like any other; ``close_chunk`` ends it.

Requests held by a chunk belong to the batch, not to a runner: ``recover`` leaves them alone
(charging and re-queueing them would send them twice while the batch still runs at OpenAI).
A runner re-attaches the open chunks no live runner watches (``attach_chunks``); a chunk that
was never created (no batch carries its tag) is ``abandon_chunk``-ed: its requests go back to
pending at no charge, since nothing of it was sent.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import RunnerLostError
from ..structured import format_body
from .budgets import move_budgets
from .claims import LIVE, ClaimsMixin, _move_books
from .reads import ReadsMixin
from .records import SWITCH_EVENT, BatchInfo, JobStatus, PendingRequest, RequestState, ResultFlag
from .schema import batches, flagged, requests, results, runners

PREPARED, SUBMITTED, CLOSED, ABANDONED = "prepared", "submitted", "closed", "abandoned"
OPEN = (PREPARED, SUBMITTED)
_ID_CHUNK = 2000  # ids per statement


def _info(row: Any) -> BatchInfo:
    return BatchInfo(
        id=row.id,
        job_id=row.job_id,
        tag=row.tag,
        url=row.url,
        model=row.model,
        state=row.state,
        requests=row.requests,
        bytes=row.bytes,
        input_tokens=row.input_tokens,
        worst_pico=row.worst_pico,
        prepared_at=row.prepared_at,
        watcher=row.watcher,
        file_id=row.file_id,
        batch_id=row.batch_id,
        status=row.status,
        total=row.total,
        completed=row.completed,
        failed=row.failed,
        output_file_id=row.output_file_id,
        error_file_id=row.error_file_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        error=row.error,
    )


def _held(chunk_id: int) -> sa.ColumnElement[bool]:
    """Requests the chunk holds: reserved, no runner, this chunk."""
    return sa.and_(
        requests.c.chunk_id == chunk_id,
        requests.c.state == RequestState.RESERVED,
        requests.c.runner_id.is_(None),
    )


class BatchesMixin(ClaimsMixin, ReadsMixin):
    def open_chunk(
        self,
        runner_id: int,
        request_ids: list[int],
        *,
        tag: str,
        url: str,
        model: str,
        size: int,
        input_tokens: int,
    ) -> BatchInfo:
        """Record the intent to submit these requests (claimed by ``runner_id``) as one batch,
        and hand them to it; the runner watches it."""
        now = self.now()
        with self.writing() as conn:
            job_id = self._fence(conn, runner_id)
            chunk_id = conn.execute(
                batches.insert().values(
                    job_id=job_id,
                    tag=tag,
                    url=url,
                    model=model,
                    state=PREPARED,
                    watcher=runner_id,
                    requests=len(request_ids),
                    bytes=size,
                    input_tokens=input_tokens,
                    worst_pico=0,
                    prepared_at=now,
                )
            ).inserted_primary_key[0]
            moved = worst = 0
            for start in range(0, len(request_ids), _ID_CHUNK):
                ids = request_ids[start : start + _ID_CHUNK]
                mine = sa.and_(
                    requests.c.id.in_(ids),
                    requests.c.state == RequestState.RESERVED,
                    requests.c.runner_id == runner_id,
                )
                worst += int(
                    conn.execute(
                        sa.select(sa.func.coalesce(sa.func.sum(requests.c.reserved_pico), 0)).where(
                            mine
                        )
                    ).scalar_one()
                )
                moved += conn.execute(
                    requests.update().where(mine).values(runner_id=None, chunk_id=chunk_id)
                ).rowcount
            if moved != len(request_ids):
                raise RunnerLostError(
                    f"{self.name}: {len(request_ids) - moved} request(s) of a batch being prepared "
                    "are no longer held by this runner"
                )
            conn.execute(batches.update().where(batches.c.id == chunk_id).values(worst_pico=worst))
            row = conn.execute(sa.select(batches).where(batches.c.id == chunk_id)).one()
        return _info(row)

    def _watched(self, conn: Connection, runner_id: int, chunk_id: int) -> None:
        """Fence a write about a chunk: this runner is live and still watches it."""
        self._fence(conn, runner_id)
        watcher = conn.execute(
            sa.select(batches.c.watcher).where(batches.c.id == chunk_id)
        ).scalar()
        if watcher != runner_id:
            raise RunnerLostError(
                f"{self.name}: batch chunk {chunk_id} is watched by another batchrun process now"
            )

    def update_chunk(self, runner_id: int, chunk_id: int, **values: Any) -> None:
        """Record what became known about a chunk (file id, batch id, status, counts...)."""
        with self.writing() as conn:
            self._watched(conn, runner_id, chunk_id)
            conn.execute(batches.update().where(batches.c.id == chunk_id).values(**values))

    def close_chunk(self, runner_id: int, chunk_id: int, **values: Any) -> None:
        """The chunk's results are recorded (its requests all settled or handed back)."""
        with self.writing() as conn:
            self._watched(conn, runner_id, chunk_id)
            conn.execute(
                batches.update()
                .where(batches.c.id == chunk_id)
                .values(state=CLOSED, closed_at=self.now(), **values)
            )

    def abandon_chunk(self, runner_id: int, chunk_id: int, reason: str) -> int:
        """The chunk's batch was never created: its requests go back to pending, uncharged
        (nothing of them was sent). Returns how many."""
        with self.writing() as conn:
            self._watched(conn, runner_id, chunk_id)
            job_id = conn.execute(
                sa.select(batches.c.job_id).where(batches.c.id == chunk_id)
            ).scalar_one()
            held = conn.execute(
                sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(requests.c.reserved_pico), 0)
                ).where(_held(chunk_id))
            ).one()
            by_budget = conn.execute(
                sa.select(
                    requests.c.budget_id,
                    requests.c.budget_period,
                    sa.func.sum(requests.c.reserved_pico),
                )
                .where(_held(chunk_id), requests.c.budget_id.is_not(None))
                .group_by(requests.c.budget_id, requests.c.budget_period)
            ).all()
            conn.execute(
                requests.update()
                .where(_held(chunk_id))
                .values(state=RequestState.PENDING, reserved_pico=0, last_error=reason)
            )
            _move_books(conn, job_id, 0, -int(held[1]))
            move_budgets(conn, {(int(b), int(p)): [0, -int(n), 0] for b, p, n in by_budget})
            conn.execute(
                batches.update()
                .where(batches.c.id == chunk_id)
                .values(state=ABANDONED, closed_at=self.now(), error=reason)
            )
        return int(held[0])

    def attach_chunks(self, runner_id: int) -> list[BatchInfo]:
        """Take over watching the job's open chunks that no live runner watches; return every
        open chunk this runner watches, oldest first."""
        with self.writing() as conn:
            job_id = self._fence(conn, runner_id)
            live = sa.select(runners.c.id).where(
                runners.c.job_id == job_id, runners.c.state == LIVE
            )
            conn.execute(
                batches.update()
                .where(
                    batches.c.job_id == job_id,
                    batches.c.state.in_(OPEN),
                    sa.or_(batches.c.watcher.is_(None), batches.c.watcher.not_in(live)),
                )
                .values(watcher=runner_id)
            )
            rows = conn.execute(
                sa.select(batches)
                .where(
                    batches.c.job_id == job_id,
                    batches.c.state.in_(OPEN),
                    batches.c.watcher == runner_id,
                )
                .order_by(batches.c.id)
            ).all()
        return [_info(r) for r in rows]

    def chunk_requests(self, chunk_id: int) -> list[PendingRequest]:
        """The requests a chunk still holds, in file order (the order of its input file's
        lines), without their bodies (settling a result does not need them): a body that asks
        for JSON is kept as the JSON format alone (``structured.format_body``, one string per
        distinct format), so that the outputs can be checked against it."""
        names_json = sa.or_(
            requests.c.body.like('%"json_schema"%'), requests.c.body.like('%"json_object"%')
        )
        formats: dict[str, str] = {}
        held: list[PendingRequest] = []
        with self.reading() as conn:
            rows = conn.execution_options(yield_per=2000).execute(
                sa.select(
                    requests.c.id,
                    requests.c.seq,
                    requests.c.custom_id,
                    requests.c.url,
                    requests.c.model,
                    requests.c.input_tokens,
                    requests.c.output_limit,
                    requests.c.reserved_pico,
                    requests.c.attempts,
                    requests.c.line,
                    requests.c.unbounded,
                    sa.case((names_json, requests.c.body), else_=None).label("json_body"),
                )
                .where(_held(chunk_id))
                .order_by(requests.c.seq)
            )
            for r in rows:
                kept = format_body(r.url, r.json_body) if r.json_body else None
                held.append(
                    PendingRequest(
                        id=r.id,
                        seq=r.seq,
                        custom_id=r.custom_id,
                        url=r.url,
                        model=r.model,
                        body=formats.setdefault(kept, kept) if kept else "",
                        input_tokens=r.input_tokens,
                        output_limit=r.output_limit,
                        worst_pico=int(r.reserved_pico),
                        attempts=r.attempts,
                        line=r.line,
                        unbounded=bool(r.unbounded),
                    )
                )
        return held

    def chunk_by_tag(self, tag: str) -> BatchInfo | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(batches).where(batches.c.tag == tag)).first()
        return _info(row) if row else None

    def job_batches(self, job_id: int) -> list[BatchInfo]:
        """Every batch of the job, oldest first."""
        with self.reading() as conn:
            rows = conn.execute(
                sa.select(batches).where(batches.c.job_id == job_id).order_by(batches.c.id)
            ).all()
        return [_info(r) for r in rows]

    def in_batches(self, job_id: int) -> int:
        """Reserved requests of the job that open batches hold (no runner does)."""
        with self.reading() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        requests.c.job_id == job_id,
                        requests.c.state == RequestState.RESERVED,
                        requests.c.runner_id.is_(None),
                        requests.c.chunk_id.is_not(None),
                    )
                ).scalar_one()
            )

    def status(self, job_id: int) -> JobStatus:
        """The job's status (``ReadsMixin.status``) with its batches."""
        status = super().status(job_id)
        status.batches = self.job_batches(job_id)
        status.in_batches = self.in_batches(job_id)
        if status.batches:
            status.lanes = self.lanes(job_id)
            switched = self.last_event(job_id, SWITCH_EVENT)
            status.switched_at = switched[0] if switched is not None else None
        return status

    def lanes(self, job_id: int) -> dict[str, tuple[int, int]]:
        """The job's results by the lane they came back through: (results, cost)."""
        lane = sa.case(
            (flagged(ResultFlag.BATCH), "batch"), (flagged(ResultFlag.FLEX), "flex"), else_="sync"
        )
        with self.reading() as conn:
            return {
                str(name): (int(n), int(cost or 0))
                for name, n, cost in conn.execute(
                    sa.select(lane, sa.func.count(), sa.func.sum(results.c.cost_pico))
                    .select_from(results.join(requests, results.c.request_id == requests.c.id))
                    .where(requests.c.job_id == job_id, requests.c.state == RequestState.DONE)
                    .group_by(lane)
                )
            }
