"""What the reports read: counts by state, spend, status, and the export stream."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import sqlalchemy as sa

from ..calibration import PPM, ModelCalibration
from .base import StoreBase
from .jobs import job_from_row
from .records import (
    UNLIMITED_STRATUM,
    ExportRow,
    JobStatus,
    ModelSample,
    RequestState,
    ResultFlag,
    RunnerInfo,
    Spend,
)
from .schema import attempts, events, flagged, jobs, ledger, requests, results, runners

LIVE = "live"

_SUM_KEYS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "output_limit",
    "cost_pico",
    "reused",
    "reused_pico",
    "usage_missing",
    "outputs_not_json",
    "outputs_mismatch",
)


_BUCKETS = 24  # output limits up to 2^24 tokens have a bucket of their own


def _stratum(open_from: Mapping[str, int]) -> sa.ColumnElement[int]:
    """A request's stratum within its model, for a sample and a projection:
    ``UNLIMITED_STRATUM`` when it is priced at its model's largest output (it set no limit, or
    one as large: what it writes does not follow that limit; ``open_from`` gives the limit per
    model), else the power of two its output limit rounds up to (0 for none, 1 for 2, ...), so
    each stratum's limits are within a factor of two of each other."""
    limit = requests.c.output_limit
    whens: list[tuple[sa.ColumnElement[bool], int]] = []
    if open_from:
        most = sa.case(
            dict(open_from), value=requests.c.model, else_=sa.literal(2**62, sa.BigInteger)
        )
        whens.append((limit >= most, UNLIMITED_STRATUM))
    whens += [(limit <= 2**k, k) for k in range(_BUCKETS)]
    return sa.case(*whens, else_=_BUCKETS)


def _done_sums(
    conn: sa.Connection, job_id: int, column: sa.ColumnElement[str]
) -> dict[str, dict[str, int]]:
    """Tokens and cost of the finished requests, grouped by ``column`` (model or url).

    ``cost_pico`` counts what this job spent; reused results (copied from an earlier job) are
    counted apart.
    """
    reused = flagged(ResultFlag.REUSED)

    def total(value: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
        return sa.func.coalesce(sa.func.sum(value), 0)

    rows = conn.execute(
        sa.select(
            column,
            sa.func.count(),
            total(results.c.prompt_tokens),
            total(results.c.completion_tokens),
            total(results.c.cached_tokens),
            total(results.c.reasoning_tokens),
            total(requests.c.output_limit),
            total(sa.case((reused, 0), else_=results.c.cost_pico)),
            total(sa.case((reused, 1), else_=0)),
            total(sa.case((reused, results.c.cost_pico), else_=0)),
            total(sa.case((flagged(ResultFlag.USAGE_MISSING), 1), else_=0)),
            total(sa.case((flagged(ResultFlag.OUTPUT_NOT_JSON), 1), else_=0)),
            total(sa.case((flagged(ResultFlag.OUTPUT_MISMATCH), 1), else_=0)),
        )
        .select_from(results.join(requests, results.c.request_id == requests.c.id))
        .where(requests.c.job_id == job_id, requests.c.state == RequestState.DONE)
        .group_by(column)
        .order_by(column)
    )
    return {str(r[0]): dict(zip(_SUM_KEYS, map(int, r[1:]), strict=True)) for r in rows}


def _unpriced(conn: sa.Connection, job_id: int) -> tuple[dict[str, int], int]:
    """The job's results the price table could not price: per model the responses named
    (``ResultFlag.UNPRICED_MODEL``), and how many reported a tier without prices."""
    model = sa.func.coalesce(results.c.response_model, "?")
    flagged_model = flagged(ResultFlag.UNPRICED_MODEL)
    flagged_tier = flagged(ResultFlag.UNPRICED_TIER)
    rows = conn.execute(
        sa.select(model, flagged_model, sa.func.count())
        .select_from(results.join(requests, results.c.request_id == requests.c.id))
        .where(requests.c.job_id == job_id, sa.or_(flagged_model, flagged_tier))
        .group_by(model, flagged_model)
    ).all()
    models: dict[str, int] = {}
    tiers = 0
    for name, is_model, n in rows:
        if is_model:
            models[str(name)] = models.get(str(name), 0) + int(n)
        else:
            tiers += int(n)
    return dict(sorted(models.items())), tiers


class Sharing:
    """How the job's live runners share its rate limits now: equally while requests wait to be
    claimed; once none is left, in proportion to what each still holds, so that they finish
    together (one with nothing left to send leaves its share to the others)."""

    def __init__(self, conn: sa.Connection, job_id: int | None) -> None:
        self.live = int(
            conn.execute(
                sa.select(sa.func.count()).where(
                    runners.c.job_id == job_id, runners.c.state == LIVE
                )
            ).scalar_one()
        )
        self.holding = holding(conn, job_id)
        self.waiting = (
            conn.execute(
                sa.select(requests.c.id)
                .where(requests.c.job_id == job_id, requests.c.state == RequestState.PENDING)
                .limit(1)
            ).first()
            is not None
        )

    def share(self, runner_id: int) -> float:
        """Runner ``runner_id``'s share of the limits."""
        if self.waiting or not self.holding:
            return 1.0 / max(self.live, 1)
        mine = self.holding.get(runner_id, 0)
        total = sum(self.holding.values())
        return max(mine, 1) / (total + (0 if mine else 1))


def holding(conn: sa.Connection, job_id: int | None) -> dict[int, int]:
    """Live runners of the job that hold claims, and how many each holds."""
    rows = conn.execute(
        sa.select(requests.c.runner_id, sa.func.count())
        .select_from(requests.join(runners, runners.c.id == requests.c.runner_id))
        .where(
            requests.c.job_id == job_id,
            requests.c.state == RequestState.RESERVED,
            runners.c.state == LIVE,
        )
        .group_by(requests.c.runner_id)
    ).all()
    return {int(r[0]): int(r[1]) for r in rows}


class ReadsMixin(StoreBase):
    def live_runners(self, job_id: int) -> list[RunnerInfo]:
        """The job's runners registered as live, with the requests each holds, its share of the
        rate limits (the rule their heartbeats apply), how long ago it last beat and whether
        that heartbeat expired (database clock)."""
        with self.reading() as conn:
            now = self.wall_clock(conn)
            rows = conn.execute(
                sa.select(runners)
                .where(runners.c.job_id == job_id, runners.c.state == LIVE)
                .order_by(runners.c.id)
            ).all()
            sharing = Sharing(conn, job_id)
        return [
            RunnerInfo(
                id=r.id,
                host=r.host,
                pid=r.pid,
                started_at=r.started_at,
                heartbeat_at=r.heartbeat_at,
                expires_at=r.expires_at,
                in_flight=r.in_flight,
                state=r.state,
                via=r.via,
                holding=sharing.holding.get(r.id, 0),
                share=sharing.share(r.id),
                seen_ago=max(0.0, now - r.heartbeat_at),
                expired=r.expires_at < now,
            )
            for r in rows
        ]

    def spend(self, job_id: int) -> Spend:
        with self.reading() as conn:
            row = conn.execute(
                sa.select(jobs.c.settled_pico, jobs.c.reserved_pico).where(jobs.c.id == job_id)
            ).one()
        return Spend(int(row.settled_pico), int(row.reserved_pico))

    def last_event(self, job_id: int, kind: str) -> tuple[float, str | None] | None:
        """(when, detail) of the job's latest event of ``kind``, if it has one."""
        with self.reading() as conn:
            row = conn.execute(
                sa.select(events.c.at, events.c.detail)
                .where(events.c.job_id == job_id, events.c.kind == kind)
                .order_by(events.c.at.desc(), events.c.id.desc())
                .limit(1)
            ).first()
        return None if row is None else (float(row.at), row.detail)

    def state_counts(self, job_id: int, only: tuple[str, ...] = ()) -> dict[str, int]:
        """Requests by state: one pass over the (job_id, state, seq) index (over the part of
        it in the states ``only``, if given: cheap for the few reserved ones of a big job)."""
        q = sa.select(requests.c.state, sa.func.count()).where(requests.c.job_id == job_id)
        if only:
            q = q.where(requests.c.state.in_(only))
        with self.reading() as conn:
            return {str(state): int(n) for state, n in conn.execute(q.group_by(requests.c.state))}

    def open_by_model(self, job_id: int) -> dict[str, tuple[int, int, int]]:
        """The requests not yet finished (pending or reserved) that ask for no service tier
        of their own, by model: (requests, input tokens, output limit tokens). What the deadline
        plan's flex lane is made of."""
        big = sa.BigInteger
        q = (
            sa.select(
                requests.c.model,
                sa.func.count(),
                sa.func.sum(sa.cast(requests.c.input_tokens, big)),
                sa.func.sum(sa.cast(requests.c.output_limit, big)),
            )
            .where(
                requests.c.job_id == job_id,
                requests.c.state.in_((RequestState.PENDING, RequestState.RESERVED)),
                ~requests.c.body.like('%"service_tier":%'),
            )
            .group_by(requests.c.model)
        )
        with self.reading() as conn:
            return {str(m): (int(n), int(i or 0), int(o or 0)) for m, n, i, o in conn.execute(q)}

    def pending_worst(self, job_id: int, *, batch: bool = False) -> int:
        """The worst case of every request not yet sent (at Batch API prices when ``batch``)."""
        worst = requests.c.batch_worst_pico if batch else requests.c.worst_pico
        with self.reading() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(worst), 0)).where(
                        requests.c.job_id == job_id, requests.c.state == RequestState.PENDING
                    )
                ).scalar_one()
            )

    def unbounded_pending(self, job_id: int) -> int:
        """Pending requests whose cost the plan cannot bound (stored conversations)."""
        with self.reading() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(
                        requests.c.job_id == job_id,
                        requests.c.state == RequestState.PENDING,
                        requests.c.unbounded.is_(True),
                    )
                ).scalar_one()
            )

    def calibration(self, job_id: int) -> dict[str, ModelCalibration]:
        """Per model of the job, the largest ratios its results were billed at: input billed
        over input counted, output billed over the output limit (ppm, rounded up; see
        ``calibration``). Results without readable usage count for nothing."""

        def ratio(
            billed: sa.ColumnElement[int], counted: sa.ColumnElement[int]
        ) -> sa.ColumnElement[int]:
            big = sa.cast(billed, sa.BigInteger) * PPM + counted - 1
            return sa.func.max(sa.case((counted > 0, big / counted), else_=0))

        q = (
            sa.select(
                requests.c.model,
                ratio(results.c.prompt_tokens, requests.c.input_tokens),
                ratio(results.c.completion_tokens, requests.c.output_limit),
                sa.func.count(),
            )
            .select_from(results.join(requests, results.c.request_id == requests.c.id))
            .where(
                requests.c.job_id == job_id,
                requests.c.state == RequestState.DONE,
                ~flagged(ResultFlag.USAGE_MISSING),
            )
            .group_by(requests.c.model)
        )
        with self.reading() as conn:
            return {
                str(m): ModelCalibration(int(i or 0), int(o or 0), int(n))
                for m, i, o, n in conn.execute(q)
            }

    def model_samples(
        self, job_id: int, open_from: Mapping[str, int], until: float | None = None
    ) -> dict[tuple[str, int], ModelSample]:
        """Per stratum of the job (see ``_stratum``), what ``projection.project`` needs (see
        ``ModelSample``); with ``until`` (epoch seconds), as things stood then: the results
        finished by then are the sample, every request without one is open."""
        big = sa.BigInteger
        out: dict[tuple[str, int], ModelSample] = {}
        of_job = requests.c.job_id == job_id
        key = _stratum(open_from)
        sums = sa.select(
            requests.c.model,
            key,
            sa.func.count(),
            sa.func.sum(sa.cast(requests.c.input_tokens, big)),
            sa.func.sum(sa.cast(requests.c.output_limit, big)),
        ).group_by(requests.c.model, key)
        still_open = requests.c.state.in_((RequestState.PENDING, RequestState.RESERVED))
        done = sa.and_(of_job, requests.c.state == RequestState.DONE)
        charged_by = ledger.c.kind == "unknown"
        if until is not None:
            finished = sa.exists().where(
                results.c.request_id == requests.c.id, results.c.finished_at <= until
            )
            still_open = ~finished
            done = sa.and_(done, results.c.finished_at <= until)
            charged_by = sa.and_(charged_by, ledger.c.at <= until)
        with self.reading() as conn:
            for model, unset, n, tin, lim in conn.execute(sums.where(of_job)):
                out[str(model), int(unset)] = ModelSample(int(n), int(tin or 0), int(lim or 0))
            for model, unset, n, tin, lim in conn.execute(sums.where(of_job, still_open)):
                s = out[str(model), int(unset)]
                s.open, s.open_input, s.open_limit = int(n), int(tin or 0), int(lim or 0)
            cols = {
                "u": sa.cast(results.c.prompt_tokens - results.c.cached_tokens, sa.Float),
                "c": sa.cast(results.c.cached_tokens, sa.Float),
                "o": sa.cast(results.c.completion_tokens, sa.Float),
                "i": sa.cast(requests.c.input_tokens, sa.Float),
                "l": sa.cast(requests.c.output_limit, sa.Float),
            }
            names = "ucoil1"
            pairs = [(a, b) for k, a in enumerate(names) for b in names[k:]]
            terms = [
                sa.func.sum(cols[a] * cols[b])
                if b != "1"
                else (sa.func.sum(cols[a]) if a != "1" else sa.func.count())
                for a, b in pairs
            ]
            exact = [
                sa.func.sum(sa.cast(results.c.prompt_tokens - results.c.cached_tokens, big)),
                sa.func.sum(sa.cast(results.c.cached_tokens, big)),
                sa.func.sum(sa.cast(results.c.completion_tokens, big)),
                sa.func.sum(sa.cast(requests.c.input_tokens, big)),
                sa.func.sum(sa.cast(requests.c.output_limit, big)),
            ]
            joined = results.join(requests, results.c.request_id == requests.c.id)
            usage = ~flagged(ResultFlag.USAGE_MISSING)
            for row in conn.execute(
                sa.select(requests.c.model, key, sa.func.count(), *exact, *terms)
                .select_from(joined)
                .where(done, usage)
                .group_by(requests.c.model, key)
            ):
                s = out[str(row[0]), int(row[1])]
                s.n = int(row[2])
                s.sum_uncached, s.sum_cached, s.sum_output, s.sum_input, s.sum_limit = (
                    int(v or 0) for v in row[3:8]
                )
                s.moments = {a + b: float(v or 0) for (a, b), v in zip(pairs, row[8:], strict=True)}
            for model, unset, booked in conn.execute(
                sa.select(requests.c.model, key, sa.func.sum(results.c.cost_pico))
                .select_from(joined)
                .where(done, ~usage)
                .group_by(requests.c.model, key)
            ):
                out[str(model), int(unset)].other_pico += int(booked or 0)
            for model, unset, charged in conn.execute(
                sa.select(requests.c.model, key, sa.func.sum(ledger.c.amount_pico))
                .select_from(ledger.join(requests, ledger.c.request_id == requests.c.id))
                .where(ledger.c.job_id == job_id, charged_by)
                .group_by(requests.c.model, key)
            ):
                out[str(model), int(unset)].other_pico += int(charged or 0)
        return out

    def worst_of(self, job_id: int, seqs: Collection[int]) -> int:
        """The worst case of these requests of the job (by sequence number)."""
        if not seqs:
            return 0
        with self.reading() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0)).where(
                        requests.c.job_id == job_id, requests.c.seq.in_(sorted(seqs))
                    )
                ).scalar_one()
            )

    def results_span(self, job_id: int) -> tuple[float | None, float | None]:
        """When the job's first and last results came in (epoch seconds)."""
        with self.reading() as conn:
            first, last = conn.execute(
                sa.select(sa.func.min(results.c.finished_at), sa.func.max(results.c.finished_at))
                .select_from(results.join(requests, results.c.request_id == requests.c.id))
                .where(requests.c.job_id == job_id)
            ).one()
        return (None if first is None else float(first)), (None if last is None else float(last))

    def models_of(self, job_id: int) -> list[str]:
        """The models the job's requests name."""
        with self.reading() as conn:
            return sorted(
                str(m)
                for (m,) in conn.execute(
                    sa.select(requests.c.model).where(requests.c.job_id == job_id).distinct()
                )
            )

    def model_strata(
        self, job_id: int, open_from: Mapping[str, int]
    ) -> dict[tuple[str, int], tuple[int, int, int]]:
        """Per stratum of the job (see ``_stratum``): its requests, what their output
        allowances (worst case less floor) sum to, and their output limits: how much of the
        job's uncertainty each holds."""
        key = _stratum(open_from)
        allowance = sa.func.sum(requests.c.worst_pico - requests.c.floor_pico)
        limits = sa.func.sum(sa.cast(requests.c.output_limit, sa.BigInteger))
        with self.reading() as conn:
            return {
                (str(m), int(u)): (int(n), int(a or 0), int(lim or 0))
                for m, u, n, a, lim in conn.execute(
                    sa.select(requests.c.model, key, sa.func.count(), allowance, limits)
                    .where(requests.c.job_id == job_id)
                    .group_by(requests.c.model, key)
                )
            }

    def iter_strata(
        self, job_id: int, stratum: tuple[str, int], open_from: Mapping[str, int]
    ) -> Iterator[tuple[int, str]]:
        """A stratum's requests as (seq, state), ordered by endpoint, output limit and file
        order: a systematic sample over this order is spread over all of them."""
        model, unset = stratum
        key = _stratum(open_from)
        q = (
            sa.select(requests.c.seq, requests.c.state)
            .where(requests.c.job_id == job_id, requests.c.model == model, key == unset)
            .order_by(requests.c.url, requests.c.output_limit, requests.c.seq)
        )
        with self.reading() as conn:
            for seq, state in conn.execution_options(yield_per=5000).execute(q):
                yield int(seq), str(state)

    def output_ratio(self, job_id: int) -> tuple[int, int]:
        """(output tokens used, output tokens allowed) by the job's finished requests, or by
        every finished request in the database while the job has none: how much of their
        output limits requests typically use."""
        done = sa.and_(requests.c.state == RequestState.DONE, requests.c.output_limit > 0)
        q = sa.select(
            sa.func.coalesce(sa.func.sum(results.c.completion_tokens), 0),
            sa.func.coalesce(sa.func.sum(requests.c.output_limit), 0),
        ).select_from(results.join(requests, results.c.request_id == requests.c.id))
        with self.reading() as conn:
            used, allowed = conn.execute(q.where(done, requests.c.job_id == job_id)).one()
            if not allowed:
                used, allowed = conn.execute(q.where(done)).one()
        return int(used), int(allowed)

    def fits_under(
        self,
        job_id: int,
        budget_pico: int,
        *,
        batch: bool = False,
        ratio: tuple[int, int] | None = None,
    ) -> int:
        """How many pending requests, taken in file order, fit in ``budget_pico`` at worst case
        (or, with ``ratio`` = (used, allowed), when each uses that share of its output limit)."""
        if budget_pico <= 0:
            return 0
        worst: sa.ColumnElement[int] = (
            requests.c.batch_worst_pico if batch else requests.c.worst_pico
        )
        if ratio is not None and ratio[1]:
            floor = requests.c.floor_pico
            share = sa.literal(min(1.0, ratio[0] / ratio[1]), sa.Float)
            worst = floor + (worst - floor) * share
        cum = (
            sa.select(sa.func.sum(worst).over(order_by=requests.c.seq).label("cum"))
            .where(requests.c.job_id == job_id, requests.c.state == RequestState.PENDING)
            .subquery()
        )
        with self.reading() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(cum).where(cum.c.cum <= budget_pico)
                ).scalar_one()
            )

    def status(self, job_id: int) -> JobStatus:
        with self.reading() as conn:
            job = job_from_row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())
            states = {
                str(k): int(n)
                for k, n in conn.execute(
                    sa.select(requests.c.state, sa.func.count())
                    .where(requests.c.job_id == job_id)
                    .group_by(requests.c.state)
                )
            }
            joined = results.join(requests, results.c.request_id == requests.c.id)
            by_model = _done_sums(conn, job_id, requests.c.model)
            by_endpoint = _done_sums(conn, job_id, requests.c.url)
            tot = {k: sum(g[k] for g in by_model.values()) for k in _SUM_KEYS}
            unknown = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount_pico), 0)).where(
                    ledger.c.job_id == job_id, ledger.c.kind == "unknown"
                )
            ).scalar_one()
            code = sa.func.coalesce(results.c.error_code, "error")  # one bind for both uses
            failed_kinds = conn.execute(
                sa.select(code, sa.func.count())
                .select_from(joined)
                .where(requests.c.job_id == job_id, requests.c.state == RequestState.FAILED)
                .group_by(code)
            ).all()
            retried = conn.execute(
                sa.select(attempts.c.error_kind, sa.func.count())
                .select_from(attempts.join(requests, attempts.c.request_id == requests.c.id))
                .where(requests.c.job_id == job_id, attempts.c.error_kind.is_not(None))
                .group_by(attempts.c.error_kind)
            ).all()
            pending = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(requests.c.worst_pico), 0),
                    sa.func.coalesce(sa.func.sum(requests.c.floor_pico), 0),
                ).where(
                    requests.c.job_id == job_id,
                    requests.c.state.in_((RequestState.PENDING, RequestState.RESERVED)),
                )
            ).one()
            books = conn.execute(
                sa.select(jobs.c.settled_pico, jobs.c.reserved_pico).where(jobs.c.id == job_id)
            ).one()
            unpriced_models, unpriced_tiers = _unpriced(conn, job_id)
        errors: dict[str, int] = {f"failed: {k}": int(n) for k, n in failed_kinds}
        errors.update({f"attempts: {k}": int(n) for k, n in retried})
        return JobStatus(
            job=job,
            states=states,
            spend=Spend(int(books.settled_pico), int(books.reserved_pico)),
            unknown_pico=int(unknown),
            input_tokens=tot["input_tokens"],
            output_tokens=tot["output_tokens"],
            cached_tokens=tot["cached_tokens"],
            reasoning_tokens=tot["reasoning_tokens"],
            done_output_limit=tot["output_limit"],
            errors=errors,
            pending_worst_pico=int(pending[0]),
            pending_floor_pico=int(pending[1]),
            reused=tot["reused"],
            reused_pico=tot["reused_pico"],
            usage_missing=tot["usage_missing"],
            outputs_not_json=tot["outputs_not_json"],
            outputs_mismatch=tot["outputs_mismatch"],
            unpriced_models=unpriced_models,
            unpriced_tiers=unpriced_tiers,
            by_model=by_model,
            by_endpoint=by_endpoint,
            runners=self.live_runners(job_id),
            calibration=self.calibration(job_id),
        )

    def json_format_request(self, job_id: int) -> tuple[str, str] | None:
        """(url, body) of the job's first request (in file order) whose body names a JSON
        output format (``json_schema`` or ``json_object``), or None: where ``export
        --fields`` takes its columns from."""
        names = sa.or_(
            requests.c.body.like('%"json_schema"%'), requests.c.body.like('%"json_object"%')
        )
        q = (
            sa.select(requests.c.url, requests.c.body)
            .where(requests.c.job_id == job_id, names)
            .order_by(requests.c.seq)
            .limit(1)
        )
        with self.reading() as conn:
            row = conn.execute(q).first()
        return None if row is None else (str(row.url), str(row.body))

    def failed(self, job_id: int) -> Iterator[tuple[str, str | None, str | None]]:
        """(custom_id, error code, error message) of every failed request, in file order."""
        q = (
            sa.select(requests.c.custom_id, results.c.error_code, results.c.error_message)
            .select_from(requests.outerjoin(results, results.c.request_id == requests.c.id))
            .where(requests.c.job_id == job_id, requests.c.state == RequestState.FAILED)
            .order_by(requests.c.seq)
        )
        with self.reading() as conn:
            for r in conn.execution_options(yield_per=2000).execute(q):
                yield r.custom_id, r.error_code, r.error_message

    def iter_export(self, job_id: int, only: str | None = None) -> Iterator[ExportRow]:
        """Every request with its result (if any), in job-file order, streamed.

        ``only`` is ``"ok"`` (requests that succeeded) or ``"failed"`` (failed for good).
        """
        q = (
            sa.select(
                requests.c.seq,
                requests.c.custom_id,
                requests.c.state,
                requests.c.last_error,
                requests.c.url,
                results.c.status_code,
                results.c.body,
                results.c.api_request_id,
                results.c.error_code,
                results.c.error_message,
                results.c.request_id,
                results.c.prompt_tokens,
                results.c.completion_tokens,
                results.c.cost_pico,
            )
            .select_from(requests.outerjoin(results, results.c.request_id == requests.c.id))
            .where(requests.c.job_id == job_id)
            .order_by(requests.c.seq)
        )
        if only == "ok":
            q = q.where(requests.c.state == RequestState.DONE)
        elif only == "failed":
            q = q.where(requests.c.state == RequestState.FAILED)
        with self.reading() as conn:
            for r in conn.execution_options(yield_per=2000).execute(q):
                yield ExportRow(
                    seq=r.seq,
                    custom_id=r.custom_id,
                    state=str(r.state),
                    last_error=r.last_error,
                    status_code=r.status_code,
                    body=r.body,
                    api_request_id=r.api_request_id,
                    error_code=r.error_code,
                    error_message=r.error_message,
                    has_result=r.request_id is not None,
                    url=r.url,
                    prompt_tokens=r.prompt_tokens or 0,
                    completion_tokens=r.completion_tokens or 0,
                    cost_pico=r.cost_pico or 0,
                )
