"""Jobs: importing a planned job in one transaction, finding it again, changing its cap."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ..errors import StoreError
from .base import StoreBase
from .records import INVALID_OUTPUT_FLAGS, Job, NewRequest, RequestState, Requeued, ResultFlag
from .schema import flagged, jobs, requests, results

IDS_PER_STATEMENT = 2000  # ids in one IN (...) or one executemany

_REQUEST_COLUMNS = (
    "job_id", "seq", "line", "custom_id", "url", "model", "body", "input_tokens",
    "output_limit", "worst_pico", "floor_pico", "approximate", "unbounded", "batch_worst_pico",
)  # fmt: skip


def _add_flag(flags: str | None, flag: ResultFlag) -> str:
    present = [f for f in (flags or "").split(",") if f]
    return ",".join(present if flag in present else [*present, flag])


def job_from_row(row: Any) -> Job:
    return Job(
        id=row.id,
        path=row.path,
        sha256=row.sha256,
        cap_pico=row.cap_pico,
        state=row.state,
        requests=row.requests,
        input_tokens=row.input_tokens,
        output_limit_tokens=row.output_limit_tokens,
        floor_pico=row.floor_pico,
        worst_pico=row.worst_pico,
        created_at=row.created_at,
        prices_fingerprint=row.prices_fingerprint,
    )


class JobsMixin(StoreBase):
    def job_by_sha(self, sha256: str) -> Job | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.sha256 == sha256)).first()
        return job_from_row(row) if row else None

    def job_by_id(self, job_id: int) -> Job | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return job_from_row(row) if row else None

    def jobs_for_path(self, path: str) -> list[Job]:
        """Jobs imported from ``path``, newest first."""
        with self.reading() as conn:
            rows = conn.execute(
                sa.select(jobs).where(jobs.c.path == path).order_by(jobs.c.id.desc())
            ).all()
        return [job_from_row(r) for r in rows]

    def all_jobs(self) -> list[Job]:
        with self.reading() as conn:
            rows = conn.execute(sa.select(jobs).order_by(jobs.c.id)).all()
        return [job_from_row(r) for r in rows]

    def create_job(
        self,
        path: str,
        sha256: str,
        cap_pico: int,
        rows: Iterable[NewRequest],
        totals: Any,
        *,
        prices_fingerprint: str | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> Job:
        """Import a whole job in one transaction: all of it, or (on any error) none of it.

        ``rows`` is consumed lazily (the job file is streamed through it); ``totals`` is read
        only after ``rows`` is exhausted, so a planner can fill it in as it goes.
        ``before_commit`` runs last inside the transaction: raising there (the file changed
        while it was read, say) leaves nothing behind.
        """
        now = self.now()
        try:
            with self.writing() as conn:
                job_id = conn.execute(
                    jobs.insert().values(
                        path=path,
                        sha256=sha256,
                        created_at=now,
                        updated_at=now,
                        cap_pico=cap_pico,
                        state="new",
                        requests=0,
                        input_tokens=0,
                        output_limit_tokens=0,
                        floor_pico=0,
                        worst_pico=0,
                        prices_fingerprint=prices_fingerprint,
                    )
                ).inserted_primary_key[0]
                self._insert_requests(conn, job_id, rows)
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(
                        requests=totals.requests,
                        input_tokens=totals.input_tokens,
                        output_limit_tokens=totals.output_limit_tokens,
                        floor_pico=totals.floor_pico,
                        worst_pico=totals.worst_pico,
                    )
                )
                if before_commit is not None:
                    before_commit()
        except StoreError:
            existing = self.job_by_sha(sha256)
            if existing is not None:  # another process imported the same file meanwhile
                return existing
            raise
        job = self.job_by_id(job_id)
        assert job is not None
        return job

    def _insert_requests(
        self, conn: sa.Connection, job_id: int, rows: Iterable[NewRequest]
    ) -> None:
        """Stream the rows in with the dialect's bulk path (COPY, or raw executemany)."""
        self.dialect.insert_many(
            conn,
            requests,
            _REQUEST_COLUMNS,
            (
                (
                    job_id, r.seq, r.line, r.custom_id, r.url, r.model, r.body, r.input_tokens,
                    r.output_limit, r.worst_pico, r.floor_pico, r.approximate, r.unbounded,
                    r.batch_worst_pico,
                )
                for r in rows
            ),
            stream=True,
        )  # fmt: skip

    def set_job(self, job_id: int, **values: Any) -> None:
        """Update a job's cap, state, path or price fingerprint."""
        values["updated_at"] = self.now()
        with self.writing() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))

    def compare_jobs(self, job_id: int, earlier_job_id: int) -> tuple[int, int, int]:
        """(changed, added, vanished) custom_ids of ``job_id`` against ``earlier_job_id``."""
        new, old = requests.alias("new"), requests.alias("old")
        pair = sa.and_(old.c.custom_id == new.c.custom_id, old.c.job_id == earlier_job_id)
        with self.reading() as conn:
            changed = conn.execute(
                sa.select(sa.func.count())
                .select_from(new.join(old, pair))
                .where(new.c.job_id == job_id, old.c.body != new.c.body)
            ).scalar_one()
            common = conn.execute(
                sa.select(sa.func.count())
                .select_from(new.join(old, pair))
                .where(new.c.job_id == job_id)
            ).scalar_one()
            counts = dict(
                conn.execute(
                    sa.select(requests.c.job_id, sa.func.count())
                    .where(requests.c.job_id.in_((job_id, earlier_job_id)))
                    .group_by(requests.c.job_id)
                ).all()
            )
        return int(changed), counts.get(job_id, 0) - common, counts.get(earlier_job_id, 0) - common

    def reuse_results(self, job_id: int, earlier_job_id: int) -> tuple[int, int]:
        """Copy the results of ``earlier_job_id``'s finished requests into ``job_id`` for every
        pending request with the same custom_id and the same body: they were paid for once.
        The copies keep their cost, are flagged ``reused`` and are not in this job's ledger (its
        cap does not pay for them again). Returns (requests, picodollars) reused."""
        new, old = requests.alias("new"), requests.alias("old")
        same = (
            sa.select(new.c.id.label("rid"), old.c.id.label("oid"), old.c.attempts)
            .select_from(
                new.join(
                    old,
                    sa.and_(
                        old.c.job_id == earlier_job_id,
                        old.c.custom_id == new.c.custom_id,
                        old.c.body == new.c.body,
                        old.c.state == RequestState.DONE,
                    ),
                )
            )
            .where(new.c.job_id == job_id, new.c.state == RequestState.PENDING)
        )
        columns = [c.name for c in results.columns if c.name not in ("request_id", "flags")]
        copied = 0
        with self.writing() as conn:
            pairs = conn.execute(same).all()
            for start in range(0, len(pairs), IDS_PER_STATEMENT):
                chunk = pairs[start : start + IDS_PER_STATEMENT]
                by_old = {p.oid: p for p in chunk}
                rows = conn.execute(
                    sa.select(results).where(results.c.request_id.in_(list(by_old)))
                ).all()
                conn.execute(
                    results.insert(),
                    [
                        {
                            "request_id": by_old[r.request_id].rid,
                            "flags": _add_flag(r.flags, ResultFlag.REUSED),
                            **{c: getattr(r, c) for c in columns},
                        }
                        for r in rows
                    ],
                )
                copied += sum(int(r.cost_pico) for r in rows)
                conn.execute(
                    requests.update()
                    .where(requests.c.id == sa.bindparam("rid"))
                    .values(state=RequestState.DONE, attempts=sa.bindparam("n")),
                    [{"rid": p.rid, "n": p.attempts} for p in chunk],
                )
        return len(pairs), copied

    def requeue_failed(self, job_id: int, codes: frozenset[str]) -> int:
        """Queue failed requests again (those whose error code or HTTP status is in ``codes``;
        every failed one if ``codes`` is empty). Their failed results (which cost nothing) go;
        every attempt stays in ``attempts``. Returns how many were queued."""
        failed = sa.select(requests.c.id).where(
            requests.c.job_id == job_id, requests.c.state == RequestState.FAILED
        )
        if codes:
            matching = sa.select(results.c.request_id).where(
                sa.or_(
                    results.c.error_code.in_(sorted(codes)),
                    sa.cast(results.c.status_code, sa.String).in_(sorted(codes)),
                )
            )
            failed = failed.where(requests.c.id.in_(matching))
        with self.writing() as conn:
            ids = [r.id for r in conn.execute(failed)]
            for start in range(0, len(ids), IDS_PER_STATEMENT):
                chunk = ids[start : start + IDS_PER_STATEMENT]
                conn.execute(results.delete().where(results.c.request_id.in_(chunk)))
                conn.execute(
                    requests.update()
                    .where(requests.c.id.in_(chunk))
                    .values(state=RequestState.PENDING, attempts=0, last_error=None)
                )
        return len(ids)

    def requeue_invalid(self, job_id: int, codes: frozenset[str] = frozenset()) -> Requeued:
        """Queue again the finished requests whose outputs were not the JSON they asked for
        (flagged ``OUTPUT_NOT_JSON`` or ``OUTPUT_MISMATCH``; only the kinds ``codes`` names
        when it names one). They were billed: their ledger charges stay (the job's spend and
        its budget's keep them) and sending them again is paid again, under the same cap.
        Their results go, so the job's token counts keep only their new ones. Returns how
        many, what they were billed and their worst cases again (sync, batch)."""
        kinds = [f for f in INVALID_OUTPUT_FLAGS if f.value in codes] or list(INVALID_OUTPUT_FLAGS)
        invalid = sa.or_(*(flagged(f) for f in kinds))
        reused = flagged(ResultFlag.REUSED)
        q = (
            sa.select(
                requests.c.id,
                sa.case((reused, 0), else_=results.c.cost_pico),
                requests.c.worst_pico,
                requests.c.batch_worst_pico,
            )
            .select_from(results.join(requests, results.c.request_id == requests.c.id))
            .where(requests.c.job_id == job_id, requests.c.state == RequestState.DONE, invalid)
        )
        with self.writing() as conn:
            found = conn.execute(q).all()
            ids = [r[0] for r in found]
            for start in range(0, len(ids), IDS_PER_STATEMENT):
                chunk = ids[start : start + IDS_PER_STATEMENT]
                conn.execute(results.delete().where(results.c.request_id.in_(chunk)))
                conn.execute(
                    requests.update()
                    .where(requests.c.id.in_(chunk))
                    .values(state=RequestState.PENDING, attempts=0, last_error=None)
                )
        return Requeued(
            len(ids),
            sum(int(r[1] or 0) for r in found),
            sum(int(r[2]) for r in found),
            sum(int(r[3]) for r in found),
        )

    def reprice(
        self,
        job_id: int,
        rates: Callable[[str, str | None], tuple[int, int, int, int, int, int]],
        fingerprint: str,
        tier_of: Callable[[str], str | None] | None = None,
    ) -> tuple[int, int, int]:
        """Price the job's pending requests again under a changed price table: ``rates(model,
        tier)`` gives (input, output, batch input, batch output) picodollars per token and what
        a worst case adds per request (sync, batch), at a service tier's prices (None:
        standard). ``tier_of(body)`` reads the tier a stored body asks for: the few bodies
        that name one are priced in Python, the rest by one statement per model. Returns
        (requests repriced, pending worst case before, after)."""
        pending = sa.and_(requests.c.job_id == job_id, requests.c.state == RequestState.PENDING)
        names_tier = requests.c.body.like('%"service_tier":%')
        with self.writing() as conn:
            models = [
                r[0] for r in conn.execute(sa.select(requests.c.model).where(pending).distinct())
            ]
            before = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0)).where(pending)
            ).scalar_one()
            n = 0
            tokens_in = sa.cast(requests.c.input_tokens, sa.BigInteger)
            tokens_out = sa.cast(requests.c.output_limit, sa.BigInteger)
            if tier_of is not None:
                n += self._reprice_tiered(conn, sa.and_(pending, names_tier), rates, tier_of)
            for model in models:
                rate_in, rate_out, batch_in, batch_out, slack, batch_slack = rates(model, None)
                n += conn.execute(
                    requests.update()
                    .where(pending, requests.c.model == model)
                    .where(~names_tier if tier_of is not None else sa.true())
                    .values(
                        floor_pico=tokens_in * rate_in,
                        worst_pico=tokens_in * rate_in + tokens_out * rate_out + slack,
                        batch_worst_pico=tokens_in * batch_in
                        + tokens_out * batch_out
                        + batch_slack,
                    )
                ).rowcount
            after = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0)).where(pending)
            ).scalar_one()
            conn.execute(
                jobs.update().where(jobs.c.id == job_id).values(prices_fingerprint=fingerprint)
            )
        return n, int(before), int(after)

    @staticmethod
    def _reprice_tiered(
        conn: sa.Connection,
        where: sa.ColumnElement[bool],
        rates: Callable[[str, str | None], tuple[int, int, int, int, int, int]],
        tier_of: Callable[[str], str | None],
    ) -> int:
        """Reprice the pending requests whose bodies name a service tier, each at its tier."""
        rows = conn.execute(
            sa.select(
                requests.c.id,
                requests.c.model,
                requests.c.body,
                requests.c.input_tokens,
                requests.c.output_limit,
            ).where(where)
        ).all()
        values = []
        for r in rows:
            rate_in, rate_out, batch_in, batch_out, slack, batch_slack = rates(
                r.model, tier_of(r.body)
            )
            tin, tout = int(r.input_tokens), int(r.output_limit)
            values.append(
                {
                    "rid": r.id,
                    "new_floor": tin * rate_in,
                    "new_worst": tin * rate_in + tout * rate_out + slack,
                    "new_batch_worst": tin * batch_in + tout * batch_out + batch_slack,
                }
            )
        for start in range(0, len(values), IDS_PER_STATEMENT):
            conn.execute(
                requests.update()
                .where(requests.c.id == sa.bindparam("rid"))
                .values(
                    floor_pico=sa.bindparam("new_floor"),
                    worst_pico=sa.bindparam("new_worst"),
                    batch_worst_pico=sa.bindparam("new_batch_worst"),
                ),
                values[start : start + IDS_PER_STATEMENT],
            )
        return len(values)

    def request_fingerprints(self, job_id: int) -> Iterator[tuple[str, str]]:
        """(custom_id, body) of every request, in file order, streamed."""
        with self.reading() as conn:
            result = conn.execution_options(yield_per=5000).execute(
                sa.select(requests.c.custom_id, requests.c.body)
                .where(requests.c.job_id == job_id)
                .order_by(requests.c.seq)
            )
            for row in result:
                yield row.custom_id, row.body
