"""Budgets in the database: the named limits, their books per period, and the helpers that
claims and settlements use to keep those books in the same transactions as a job's.

Lock order, everywhere: a runner's row, the job's row, then the budget's row, then its period
rows (by budget and start). Two jobs share nothing but the budget, taken last, so runners of
different jobs serialize on it for the length of a claim and never deadlock.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..budgets import Budget, BudgetBooks, JobDraw, period_of
from ..errors import StoreError, UsageError
from ..settings import BUDGET_PER, BUDGET_TZ
from .base import StoreBase, retry_conflicts
from .records import JobStatus, RequestState
from .schema import budget_periods, budgets, jobs, ledger, requests, runners

_ID_CHUNK = 2000  # ids per statement
# (budget id, period start) -> [settled, reserved, unknown] to add
Deltas = dict[tuple[int, int], list[int]]


def _budget(row: sa.Row) -> Budget:
    return Budget(
        id=int(row.id),
        name=row.name,
        amount_pico=int(row.amount_pico),
        per=row.per,
        tz=row.tz,
        is_default=bool(row.is_default),
    )


def hold_budget(conn: Connection, budget_id: int, now: float) -> BudgetBooks:
    """Lock the budget's row and its current period's (created if new); their books.

    A claim holds these locks to its end: no other claim on the budget, from any job or
    runner, can pass the limit in between; a settlement waits on the period's row."""
    row = conn.execute(
        sa.select(budgets).where(budgets.c.id == budget_id).with_for_update()
    ).first()
    if row is None:
        raise StoreError(f"budget #{budget_id} was removed while this run drew on it")
    budget = _budget(row)
    period = period_of(budget.per, budget.tz, now)
    books = _period_row(conn, budget.id, period.start, lock=True)
    if books is None:
        conn.execute(budget_periods.insert().values(budget_id=budget.id, start=period.start))
        return BudgetBooks(budget, period)
    return BudgetBooks(budget, period, *books)


def _period_row(
    conn: Connection, budget_id: int, start: int, *, lock: bool = False
) -> tuple[int, int, int] | None:
    query = sa.select(
        budget_periods.c.settled_pico, budget_periods.c.reserved_pico, budget_periods.c.unknown_pico
    ).where(budget_periods.c.budget_id == budget_id, budget_periods.c.start == start)
    row = conn.execute(query.with_for_update() if lock else query).first()
    return None if row is None else (int(row[0]), int(row[1]), int(row[2]))


def budget_tags(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[int, int]]:
    """request id -> (budget id, period start) of the requests among ``ids`` reserved under a
    budget."""
    wanted = sorted(set(ids))
    out: dict[int, tuple[int, int]] = {}
    for start in range(0, len(wanted), _ID_CHUNK):
        rows = conn.execute(
            sa.select(requests.c.id, requests.c.budget_id, requests.c.budget_period).where(
                requests.c.id.in_(wanted[start : start + _ID_CHUNK]),
                requests.c.budget_id.is_not(None),
            )
        )
        for r in rows:
            out[int(r.id)] = (int(r.budget_id), int(r.budget_period))
    return out


def add(
    deltas: Deltas, tag: tuple[int, int] | None, settled: int, reserved: int, unknown: int
) -> None:
    """Add one request's movement to its budget period's deltas (nothing without a budget)."""
    if tag is None:
        return
    d = deltas.setdefault(tag, [0, 0, 0])
    d[0] += settled
    d[1] += reserved
    d[2] += unknown


def move_budgets(conn: Connection, deltas: Mapping[tuple[int, int], list[int]]) -> None:
    """Apply the deltas to the budget periods' books, in lock order."""
    for (budget_id, start), (settled, reserved, unknown) in sorted(deltas.items()):
        if not (settled or reserved or unknown):
            continue
        conn.execute(
            budget_periods.update()
            .where(budget_periods.c.budget_id == budget_id, budget_periods.c.start == start)
            .values(
                settled_pico=budget_periods.c.settled_pico + settled,
                reserved_pico=budget_periods.c.reserved_pico + reserved,
                unknown_pico=budget_periods.c.unknown_pico + unknown,
            )
        )


class BudgetsMixin(StoreBase):
    # -- the limits -----------------------------------------------------------------------------

    @retry_conflicts
    def set_budget(
        self,
        name: str,
        amount_pico: int | None = None,
        *,
        per: str | None = None,
        tz: str | None = None,
        default: bool | None = None,
    ) -> tuple[Budget, bool]:
        """Create the budget, or change what is given of it (the amount may go up or down at
        any time: lowered below its spend, it stops new sends). Returns it, and whether it is
        new. ``default``: every run in this database draws on it unless told otherwise."""
        with self.writing() as conn:
            now = self.now()
            row = conn.execute(
                sa.select(budgets).where(budgets.c.name == name).with_for_update()
            ).first()
            values: dict[str, object] = {"updated_at": now}
            if amount_pico is not None:
                values["amount_pico"] = amount_pico
            if per is not None:
                values["per"] = per
            if tz is not None:
                values["tz"] = tz
            if default is not None:
                values["is_default"] = default
            if row is None:
                if amount_pico is None:
                    raise UsageError(
                        f"budget: no budget {name!r} yet; give its amount to create it"
                    )
                values.setdefault("per", BUDGET_PER)
                values.setdefault("tz", BUDGET_TZ)
                budget_id = int(
                    conn.execute(
                        budgets.insert().values(name=name, created_at=now, **values)
                    ).inserted_primary_key[0]
                )
            else:
                budget_id = int(row.id)
                conn.execute(budgets.update().where(budgets.c.id == budget_id).values(**values))
            if default:
                conn.execute(
                    budgets.update()
                    .where(budgets.c.id != budget_id, budgets.c.is_default)
                    .values(is_default=False, updated_at=now)
                )
            out = conn.execute(sa.select(budgets).where(budgets.c.id == budget_id)).one()
        return _budget(out), row is None

    def budgets(self) -> list[Budget]:
        with self.reading() as conn:
            rows = conn.execute(sa.select(budgets).order_by(budgets.c.name)).all()
        return [_budget(r) for r in rows]

    def budget_named(self, name: str) -> Budget | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(budgets).where(budgets.c.name == name)).first()
        return _budget(row) if row is not None else None

    def default_budget(self) -> Budget | None:
        with self.reading() as conn:
            row = conn.execute(sa.select(budgets).where(budgets.c.is_default)).first()
        return _budget(row) if row is not None else None

    @retry_conflicts
    def remove_budget(self, name: str) -> Budget:
        """Remove a budget no run draws on now (its history stays in the ledger)."""
        with self.writing() as conn:
            row = conn.execute(
                sa.select(budgets).where(budgets.c.name == name).with_for_update()
            ).first()
            if row is None:
                raise UsageError(f"budget: no budget {name!r} (see `batchrun budget list`)")
            live = conn.execute(
                sa.select(sa.func.count()).where(
                    runners.c.budget_id == row.id, runners.c.state == "live"
                )
            ).scalar_one()
            held = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(budget_periods.c.reserved_pico), 0)).where(
                    budget_periods.c.budget_id == row.id
                )
            ).scalar_one()
            if live or held:
                raise UsageError(
                    f"budget {name}: {live} runner(s) draw on it now and requests are reserved "
                    "under it; stop them (or let them finish) before removing it"
                )
            conn.execute(budget_periods.delete().where(budget_periods.c.budget_id == row.id))
            conn.execute(budgets.delete().where(budgets.c.id == row.id))
        return _budget(row)

    # -- their books ----------------------------------------------------------------------------

    def budget_books(self, budget: Budget, at: float | None = None) -> BudgetBooks:
        """The budget's books in the period holding ``at`` (default: now)."""
        with self.reading() as conn:
            now = at if at is not None else self.wall_clock(conn)
            period = period_of(budget.per, budget.tz, now)
            books = _period_row(conn, budget.id, period.start)
        return BudgetBooks(budget, period, *(books or (0, 0, 0)))

    def budget_spend(self, books: BudgetBooks, buckets: int = 200) -> list[tuple[int, float, int]]:
        """The period's spend over time, per job drawing on it: (job id, the end of a time
        bucket, what was booked in it), in time order; at most ``buckets`` buckets a job, so a
        month of ledger rows comes back as a few hundred sums."""
        bid, start = books.budget.id, books.period.start
        mine = sa.and_(ledger.c.budget_id == bid, ledger.c.budget_period == start)
        with self.reading() as conn:
            first, last = conn.execute(
                sa.select(sa.func.min(ledger.c.at), sa.func.max(ledger.c.at)).where(mine)
            ).one()
            if first is None:
                return []
            width = max((float(last) - float(first)) / max(buckets, 1), 1e-3)
            bucket = sa.cast(sa.func.floor((ledger.c.at - float(first)) / width), sa.Integer)
            rows = conn.execute(
                sa.select(ledger.c.job_id, bucket.label("b"), sa.func.sum(ledger.c.amount_pico))
                .where(mine)
                .group_by(ledger.c.job_id, bucket)
                .order_by(bucket)
            ).all()
        return [(int(j), float(first) + (int(b) + 1) * width, int(a or 0)) for j, b, a in rows]

    def budget_jobs(self, books: BudgetBooks) -> list[JobDraw]:
        """The jobs drawing on the budget in this period: spend booked there, or reserved."""
        bid, start = books.budget.id, books.period.start
        with self.reading() as conn:
            booked = {
                int(r.job_id): (int(r.spent), int(r.unknown))
                for r in conn.execute(
                    sa.select(
                        ledger.c.job_id,
                        sa.func.sum(ledger.c.amount_pico).label("spent"),
                        sa.func.sum(
                            sa.case((ledger.c.kind == "unknown", ledger.c.amount_pico), else_=0)
                        ).label("unknown"),
                    )
                    .where(ledger.c.budget_id == bid, ledger.c.budget_period == start)
                    .group_by(ledger.c.job_id)
                )
            }
            # Reservations are on requests (no index by budget): look only in the jobs whose
            # runners ever drew on it.
            drawing = sa.select(runners.c.job_id).where(runners.c.budget_id == bid).distinct()
            reserved = {
                int(r.job_id): int(r.held)
                for r in conn.execute(
                    sa.select(
                        requests.c.job_id, sa.func.sum(requests.c.reserved_pico).label("held")
                    )
                    .where(
                        requests.c.job_id.in_(drawing),
                        requests.c.state == RequestState.RESERVED,
                        requests.c.budget_id == bid,
                        requests.c.budget_period == start,
                    )
                    .group_by(requests.c.job_id)
                )
            }
            ids = sorted(booked.keys() | reserved.keys())
            paths = dict(
                conn.execute(sa.select(jobs.c.id, jobs.c.path).where(jobs.c.id.in_(ids))).all()
            )
        return [
            JobDraw(
                job_id=i,
                path=str(paths.get(i, "")),
                settled_pico=booked.get(i, (0, 0))[0],
                reserved_pico=reserved.get(i, 0),
                unknown_pico=booked.get(i, (0, 0))[1],
            )
            for i in ids
        ]

    def over_budget(self, request_id: int) -> BudgetBooks | None:
        """The budget period a reserved request draws on, if its books are past the limit (an
        unknown outcome charged while its reservation still stands: a retry would pass it)."""
        with self.reading() as conn:
            tag = budget_tags(conn, [request_id]).get(request_id)
            if tag is None:
                return None
            row = conn.execute(sa.select(budgets).where(budgets.c.id == tag[0])).first()
            books = _period_row(conn, tag[0], tag[1])
        if row is None or books is None:
            return None
        budget = _budget(row)
        period = period_of(budget.per, budget.tz, float(tag[1]))
        out = BudgetBooks(budget, period, *books)
        return out if out.settled_pico + out.reserved_pico > budget.amount_pico else None

    def job_budgets(self, job_id: int) -> list[tuple[BudgetBooks, JobDraw]]:
        """The budgets the job draws on (its runners', or booked on its ledger), each in its
        current period, with this job's share of that period."""
        with self.reading() as conn:
            ids = {
                int(i)
                for (i,) in conn.execute(
                    sa.select(runners.c.budget_id)
                    .where(runners.c.job_id == job_id, runners.c.budget_id.is_not(None))
                    .distinct()
                )
            }
            rows = conn.execute(
                sa.select(budgets).where(budgets.c.id.in_(sorted(ids))).order_by(budgets.c.name)
            ).all()
        out = []
        for row in rows:
            books = self.budget_books(_budget(row))
            draws = [d for d in self.budget_jobs(books) if d.job_id == job_id]
            share = draws[0] if draws else JobDraw(job_id, "", 0, 0, 0)
            out.append((books, share))
        return out

    def status(self, job_id: int) -> JobStatus:
        """The job's status (``BatchesMixin.status``) with the budgets it draws on."""
        status: JobStatus = super().status(job_id)  # type: ignore[misc]
        status.budgets = self.job_budgets(job_id)
        return status


def tags_of(conn: Connection, ids: Collection[int]) -> dict[int, tuple[int, int]]:
    """``budget_tags`` for a collection (empty: no query)."""
    return budget_tags(conn, ids) if ids else {}
