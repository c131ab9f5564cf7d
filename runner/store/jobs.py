"""Jobs: importing a planned job in one transaction, finding it again, changing its cap."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from ..errors import StoreError
from .base import StoreBase
from .records import Job, NewRequest
from .schema import jobs, requests

_REQUEST_COLUMNS = (
    "job_id", "seq", "line", "custom_id", "url", "model", "body", "input_tokens",
    "output_limit", "worst_pico", "floor_pico", "approximate", "unbounded", "batch_worst_pico",
)  # fmt: skip


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
        now = time.time()
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
        values["updated_at"] = time.time()
        with self.writing() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))

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
