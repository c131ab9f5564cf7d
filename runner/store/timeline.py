"""What the HTML report reads: a job's activity over time, bucketed in the database.

A job may have millions of attempts, so nothing here loads rows one by one: every series is a
GROUP BY over a bucket index computed in SQL, and latency percentiles come from ``cume_dist()``
window functions, so Python only ever holds a few hundred values per series. The SQL is plain
SQLAlchemy Core (integer floor division, CASE, window functions), the same on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import sqlalchemy as sa

from .base import StoreBase
from .records import ResultFlag
from .schema import attempts, events, flagged, ledger, requests, results

# About this many buckets per series, whatever the job's time span: enough to see its shape,
# few enough to keep the page small.
MAX_BUCKETS = 200
# Bucket widths that read well on a time axis, in seconds; past the last, whole days.
_NICE_WIDTHS = (
    0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400,
)  # fmt: skip
PERCENTILES = (50, 90, 99)
# Events that mark a period of the run (an interval starting at ``at``, ``seconds`` long).
PERIOD_EVENTS = {"rate_limit_pause": "rate_limited", "unreachable": "unreachable"}
Span = tuple[float, float]  # (start, end), epoch seconds


Poll = tuple[float, str, int, int, int]  # a batch poll: at, status, completed, failed, total


@dataclass(frozen=True, slots=True)
class Buckets:
    """Equal time buckets covering the job's activity: bucket ``i`` is
    [start + i * width, start + (i + 1) * width), in epoch seconds."""

    start: float
    width: float
    count: int

    def edge(self, i: int) -> float:
        return self.start + i * self.width

    @property
    def end(self) -> float:
        return self.edge(self.count)


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Nearest-rank percentiles of a set of latencies (ms): ``values[p]`` for p in PERCENTILES."""

    count: int
    values: dict[int, int]
    max: int


@dataclass(slots=True)
class Timeline:
    """A job's activity over time, every list one value per bucket.

    ``buckets`` is None when nothing has happened yet (no attempt, result, charge or event).
    """

    buckets: Buckets | None
    spent_pico: list[int] = field(default_factory=list)  # ledger, all kinds
    unknown_pico: list[int] = field(default_factory=list)  # of which unknown-outcome charges
    attempts: list[int] = field(default_factory=list)  # HTTP exchanges started
    done: list[int] = field(default_factory=list)  # requests finished with a result
    failed: list[int] = field(default_factory=list)  # requests that failed for good
    tokens: list[int] = field(default_factory=list)  # input + output tokens of those results
    errors: dict[str, list[int]] = field(default_factory=dict)  # error kind -> attempts
    latency: list[dict[int, int] | None] = field(default_factory=list)  # answered attempts
    latency_overall: Percentiles | None = None
    # Pauses: "rate_limited" / "unreachable" -> merged (start, end) intervals, epoch seconds
    periods: dict[str, list[Span]] = field(default_factory=dict)
    # Batch API: what each poll saw change, per chunk, in time order: (epoch seconds, the
    # batch's status, completed, failed, total). Empty for a job sent synchronously.
    batch_polls: dict[int, list[Poll]] = field(default_factory=dict)


def choose_buckets(first: float, last: float, most: int = MAX_BUCKETS) -> Buckets:
    """The narrowest readable width that covers [first, last] in at most ``most`` buckets,
    with edges on multiples of the width (whole minutes, hours...)."""
    width = float(_NICE_WIDTHS[-1])
    for nice in _NICE_WIDTHS:
        if _count(first, last, nice) <= most:
            width = float(nice)
            break
    else:
        days = 1
        while _count(first, last, days * width) > most:
            days += 1
        width *= days
    start = math.floor(first / width) * width
    return Buckets(start, width, _count(first, last, width))


def _count(first: float, last: float, width: float) -> int:
    return math.floor(last / width) - math.floor(first / width) + 1


class _Bucketer:
    """The bucket index of a time column, computed in SQL.

    Whole milliseconds since the first bucket's start, floor-divided by the width in
    milliseconds. Casting a float to an integer truncates on SQLite and rounds on PostgreSQL, so
    the cast is corrected down where it went up: the floor on both, with no FLOOR() (which
    SQLite may lack). The numbers are inlined as literals, so the expression in SELECT, GROUP BY
    and PARTITION BY is the same text on a server that binds parameters itself (PostgreSQL
    would otherwise not know that two parameters are one).
    """

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        self.width_ms = max(1, round(buckets.width * 1000))
        self._start = sa.literal_column(repr(float(buckets.start)), sa.Float)
        self._width = _int(self.width_ms)

    def __call__(self, column: sa.ColumnElement[float]) -> sa.ColumnElement[int]:
        exact = (column - self._start) * _int(1000)
        cast = sa.cast(exact, sa.BigInteger)
        ms = cast - sa.case((cast > exact, _int(1)), else_=_int(0))
        return ms // self._width

    def index(self, value: object) -> int:
        """Clamp an index the database returned into range (edges a millisecond off)."""
        return min(max(int(value), 0), self.buckets.count - 1)  # type: ignore[call-overload]


def _int(n: int) -> sa.ColumnElement[int]:
    return sa.literal_column(str(int(n)), sa.Integer)


def _not_reused() -> sa.ColumnElement[bool]:
    """Results copied from an earlier job happened in that job's time, not this one's."""
    return sa.not_(flagged(ResultFlag.REUSED))


class TimelineMixin(StoreBase):
    def timeline(self, job_id: int, most: int = MAX_BUCKETS) -> Timeline:
        """The job's spend, throughput, errors, latency and rate-limited periods over time."""
        with self.reading() as conn:
            span = _span(conn, job_id)
            if span is None:
                return Timeline(buckets=None)
            b = _Bucketer(choose_buckets(*span, most=most))
            n = b.buckets.count
            t = Timeline(
                buckets=b.buckets,
                spent_pico=[0] * n,
                unknown_pico=[0] * n,
                attempts=[0] * n,
                done=[0] * n,
                failed=[0] * n,
                tokens=[0] * n,
                latency=[None] * n,
            )
            _spend(conn, job_id, b, t)
            _attempts(conn, job_id, b, t)
            _results(conn, job_id, b, t)
            _latency(conn, job_id, b, t)
            t.periods = _periods(conn, job_id, b)
            t.batch_polls = _batch_polls(conn, job_id)
        return t


def _job_attempts() -> sa.FromClause:
    return attempts.join(requests, attempts.c.request_id == requests.c.id)


def _answered_attempts() -> sa.FromClause:
    """Attempts with their request, and its result if it has one (to tell Batch API ones)."""
    return _job_attempts().outerjoin(results, results.c.request_id == attempts.c.request_id)


def _job_results() -> sa.FromClause:
    return results.join(requests, results.c.request_id == requests.c.id)


def _span(conn: sa.Connection, job_id: int) -> tuple[float, float] | None:
    """The first and last moment anything happened to the job."""
    queries = [
        sa.select(
            sa.func.min(attempts.c.started_at),
            sa.func.max(attempts.c.started_at + attempts.c.latency_ms * 0.001),
        )
        .select_from(_job_attempts())
        .where(requests.c.job_id == job_id),
        sa.select(sa.func.min(results.c.finished_at), sa.func.max(results.c.finished_at))
        .select_from(_job_results())
        .where(requests.c.job_id == job_id, _not_reused()),
        sa.select(sa.func.min(ledger.c.at), sa.func.max(ledger.c.at)).where(
            ledger.c.job_id == job_id
        ),
        sa.select(sa.func.min(events.c.at), sa.func.max(events.c.at)).where(
            events.c.job_id == job_id
        ),
    ]
    firsts: list[float] = []
    lasts: list[float] = []
    for q in queries:
        first, last = conn.execute(q).one()
        if first is not None:
            firsts.append(float(first))
            lasts.append(float(last))
    if not firsts:
        return None
    return min(firsts), max(lasts)


def _spend(conn: sa.Connection, job_id: int, b: _Bucketer, t: Timeline) -> None:
    bucket = b(ledger.c.at)
    rows = conn.execute(
        sa.select(bucket, ledger.c.kind, sa.func.sum(ledger.c.amount_pico))
        .where(ledger.c.job_id == job_id)
        .group_by(bucket, ledger.c.kind)
    )
    for i, kind, amount in rows:
        t.spent_pico[b.index(i)] += int(amount)
        if kind == "unknown":
            t.unknown_pico[b.index(i)] += int(amount)


def _attempts(conn: sa.Connection, job_id: int, b: _Bucketer, t: Timeline) -> None:
    bucket = b(attempts.c.started_at)
    rows = conn.execute(
        sa.select(bucket, attempts.c.error_kind, sa.func.count())
        .select_from(_job_attempts())
        .where(requests.c.job_id == job_id)
        .group_by(bucket, attempts.c.error_kind)
    )
    for i, kind, n in rows:
        t.attempts[b.index(i)] += int(n)
        if kind is not None:
            t.errors.setdefault(str(kind), [0] * b.buckets.count)[b.index(i)] += int(n)
    t.errors = dict(sorted(t.errors.items(), key=lambda kv: (-sum(kv[1]), kv[0])))


def _results(conn: sa.Connection, job_id: int, b: _Bucketer, t: Timeline) -> None:
    bucket = b(results.c.finished_at)
    rows = conn.execute(
        sa.select(
            bucket,
            requests.c.state,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(results.c.prompt_tokens + results.c.completion_tokens), 0),
        )
        .select_from(_job_results())
        .where(requests.c.job_id == job_id, _not_reused())
        .group_by(bucket, requests.c.state)
    )
    for i, state, n, tokens in rows:
        if state == "done":
            t.done[b.index(i)] += int(n)
        elif state == "failed":
            t.failed[b.index(i)] += int(n)
        t.tokens[b.index(i)] += int(tokens)


def _percentile_columns(
    cd: sa.ColumnElement[float], latency: sa.ColumnElement[int]
) -> list[sa.ColumnElement[int]]:
    """Nearest-rank percentiles: the least latency whose cumulative share reaches p."""
    cols = [sa.func.min(sa.case((cd >= p / 100, latency))) for p in PERCENTILES]
    return [*cols, sa.func.max(latency), sa.func.count()]


def _latency(conn: sa.Connection, job_id: int, b: _Bucketer, t: Timeline) -> None:
    """Latency of the attempts that got an answer through the synchronous API. Errors (429s
    included) answer fast and would hide how long the API takes to do the work; the Batch API
    records no latency (its attempts say 0 ms)."""
    answered = sa.and_(
        requests.c.job_id == job_id,
        attempts.c.error_kind.is_(None),
        sa.not_(flagged(ResultFlag.BATCH)),
    )
    bucket = b(attempts.c.started_at)
    per_bucket = (
        sa.select(
            bucket.label("bucket"),
            attempts.c.latency_ms.label("ms"),
            sa.func.cume_dist()
            .over(partition_by=bucket, order_by=attempts.c.latency_ms)
            .label("cd"),
        )
        .select_from(_answered_attempts())
        .where(answered)
        .subquery()
    )
    rows = conn.execute(
        sa.select(per_bucket.c.bucket, *_percentile_columns(per_bucket.c.cd, per_bucket.c.ms))
        .group_by(per_bucket.c.bucket)
    )  # fmt: skip
    for i, *values in rows:
        pcts = dict(zip(PERCENTILES, map(int, values[: len(PERCENTILES)]), strict=True))
        t.latency[b.index(i)] = pcts
    whole = (
        sa.select(
            attempts.c.latency_ms.label("ms"),
            sa.func.cume_dist().over(order_by=attempts.c.latency_ms).label("cd"),
        )
        .select_from(_answered_attempts())
        .where(answered)
        .subquery()
    )
    row = conn.execute(sa.select(*_percentile_columns(whole.c.cd, whole.c.ms))).one()
    count = int(row[-1])
    if count:
        values = dict(zip(PERCENTILES, map(int, row[: len(PERCENTILES)]), strict=True))
        t.latency_overall = Percentiles(count, values, int(row[-2]))


def _periods(conn: sa.Connection, job_id: int, b: _Bucketer) -> dict[str, list[Span]]:
    """The pauses the runners recorded (rate-limited, unreachable), merged into intervals."""
    spans: dict[str, list[Span]] = {name: [] for name in PERIOD_EVENTS.values()}
    bucket = b(events.c.at)
    rows = conn.execute(
        sa.select(
            events.c.kind,
            bucket,
            sa.func.min(events.c.at),
            sa.func.max(events.c.at + events.c.seconds),
        )
        .where(events.c.job_id == job_id, events.c.kind.in_(PERIOD_EVENTS))
        .group_by(events.c.kind, bucket)
    )
    for kind, _i, first, last in rows:
        spans[PERIOD_EVENTS[kind]].append((float(first), min(float(last), b.buckets.end)))
    return {name: _merge(found, b.buckets.width / 2) for name, found in spans.items()}


def _merge(spans: list[Span], slack: float) -> list[Span]:
    """Overlapping intervals, and ones closer than ``slack``, as one."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + slack:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _batch_polls(conn: sa.Connection, job_id: int) -> dict[int, list[Poll]]:
    """The ``batch_poll`` events of the job (see ``Timeline.batch_polls``); one a change, so
    few: a batch's life is a handful of statuses and its counts as they moved."""
    out: dict[int, list[Poll]] = {}
    q = (
        sa.select(events.c.at, events.c.detail)
        .where(events.c.job_id == job_id, events.c.kind == "batch_poll")
        .order_by(events.c.at)
    )
    for at, detail in conn.execute(q):
        try:
            d = json.loads(detail or "")
            row = (float(at), str(d["status"]), int(d["completed"]), int(d["failed"]),
                   int(d["total"]))  # fmt: skip
            out.setdefault(int(d["chunk"]), []).append(row)
        except (ValueError, KeyError, TypeError):
            continue  # a detail this version did not write
    return out
