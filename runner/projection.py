"""What a job will really cost: a projection from the results in, with a 95% interval.

Method, per stratum (a model's requests with an output limit, and those priced at its largest
output), at sync and at Batch API prices: a request's input is priced exactly from its count
(the floor); what it costs beyond that (its output, less what cached input saved, plus what the
server counts its own way) is taken as a share of its output allowance (the worst case less the
floor). The share is a ratio estimator over the results in, and the requests still open are
projected at it. The interval is the estimator's normal interval (a t quantile for small
samples) from its variance with the finite population correction; a stratum with fewer than two
results gets its floor and worst case as its interval instead. A model's and the job's totals
add the strata's points and variances (they are sampled apart) with Welch-Satterthwaite degrees
of freedom. Spent money is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .pricing import Price, PriceTable
from .sampling import open_from
from .store import ModelSample

if TYPE_CHECKING:
    from .store import Store

CONFIDENCE = 0.95
_Z = 1.959963984540054  # the standard normal's 97.5% quantile
METHOD = (
    "per model and output-limit stratum (powers of two; no limit apart): input exact; output "
    "(and cached input, and the server's own counting) as a share of each request's output "
    "allowance, a ratio estimator over the results in; 95% interval from its variance"
)


@dataclass(frozen=True, slots=True)
class Range:
    """A projected total and its interval, in picodollars."""

    total_pico: int
    low_pico: int
    high_pico: int
    known_pico: int = 0  # of which the finished requests, priced at this lane from their tokens

    def __add__(self, other: Range) -> Range:
        return Range(
            self.total_pico + other.total_pico,
            self.low_pico + other.low_pico,
            self.high_pico + other.high_pico,
            self.known_pico + other.known_pico,
        )

    def after(self, spent_pico: int) -> Range:
        """The same projection for the open requests on top of what was really spent (a job
        whose finished requests went by another lane, or were booked otherwise)."""
        return Range(
            spent_pico + self.total_pico - self.known_pico,
            spent_pico + self.low_pico - self.known_pico,
            spent_pico + self.high_pico - self.known_pico,
            spent_pico,
        )


@dataclass(frozen=True, slots=True)
class ModelProjection:
    model: str
    requests: int
    sampled: int  # results the share was estimated from
    sync: Range
    batch: Range
    floor_pico: int  # of the whole model's requests, at sync prices
    worst_pico: int
    batch_floor_pico: int
    batch_worst_pico: int

    def lane(self, batch: bool) -> Range:
        return self.batch if batch else self.sync

    def floor(self, batch: bool) -> int:
        return self.batch_floor_pico if batch else self.floor_pico

    def worst(self, batch: bool) -> int:
        return self.batch_worst_pico if batch else self.worst_pico


@dataclass(frozen=True, slots=True)
class Projection:
    requests: int
    sampled: int
    sync: Range
    batch: Range
    by_model: dict[str, ModelProjection] = field(default_factory=dict)
    confidence: float = CONFIDENCE
    method: str = METHOD

    def lane(self, batch: bool) -> Range:
        return self.batch if batch else self.sync

    def floor_pico(self, batch: bool) -> int:
        return sum(m.floor(batch) for m in self.by_model.values())

    def worst_pico(self, batch: bool) -> int:
        return sum(m.worst(batch) for m in self.by_model.values())


def _t(df: float) -> float:
    """Student's t 97.5% quantile (Cornish-Fisher expansion; within 0.5% from 3 up)."""
    if df <= 0:
        return math.inf
    if df < 3:
        return 12.706 if df < 2 else 4.303
    z = _Z
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


@dataclass(frozen=True, slots=True)
class _Estimate:
    """One model's estimate at one lane: exact spend, the open requests' point and variance
    (``df`` its degrees of freedom; 0 when nothing could be estimated, then ``low``/``high``
    are the open requests' floor and worst case), and the bounds no estimate may leave."""

    known: int
    point: float
    var: float
    df: int
    low: float
    high: float

    def range(self) -> Range:
        if self.df == 0:
            return Range(
                self.known + round(self.point),
                self.known + math.floor(self.low),
                self.known + math.ceil(self.high),
                self.known,
            )
        return _interval(self.known, self.point, self.var, self.df, self.low, self.high)


def _interval(known: int, point: float, var: float, df: float, low: float, high: float) -> Range:
    half = _t(df) * math.sqrt(var)
    point = min(max(point, low), high)
    return Range(
        known + round(point),
        known + math.floor(max(point - half, low)),
        known + math.ceil(min(point + half, high)),
        known,
    )


def _combine(parts: list[_Estimate]) -> Range:
    """The total of several models: points and variances add (the models are sampled apart,
    so their errors are independent), with Welch-Satterthwaite degrees of freedom; a model
    without an estimate adds its floor and worst case to the interval's ends."""
    known = sum(p.known for p in parts)
    estimated = [p for p in parts if p.df > 0]
    bare = [p for p in parts if p.df == 0]
    var = sum(p.var for p in estimated)
    spread = sum(p.var * p.var / p.df for p in estimated)
    df = var * var / spread if spread > 0 else 1_000_000
    point = sum(p.point for p in estimated)
    if estimated:
        inner = _interval(
            0, point, var, max(df, 1.0), sum(p.low for p in estimated),
            sum(p.high for p in estimated),
        )  # fmt: skip
    else:
        inner = Range(0, 0, 0)
    return Range(
        known + inner.total_pico + sum(round(p.point) for p in bare),
        known + inner.low_pico + sum(math.floor(p.low) for p in bare),
        known + inner.high_pico + sum(math.ceil(p.high) for p in bare),
        known,
    )


def _lane(price: Price, s: ModelSample, batch: bool) -> _Estimate:
    rate_in, rate_cached, rate_out = price.rates(batch)
    floor_rate, worst_one = price.bounds(1, 0, batch=batch)
    slack = worst_one - floor_rate
    # What the finished requests cost at this lane's prices, from their tokens.
    done = s.done_uncached * rate_in + s.done_cached * rate_cached + s.done_output * rate_out
    known = done + s.other_pico
    floor_open = s.open_input * floor_rate
    allowance_open = s.open_limit * rate_out + s.open * slack
    worst_open = floor_open + allowance_open
    if s.open == 0:
        return _Estimate(known, 0.0, 0.0, 1, 0.0, 0.0)
    if s.n < 2:
        # Nothing to estimate a share from: the floor and the worst case.
        return _Estimate(known, floor_open + allowance_open / 2, 0.0, 0, floor_open, worst_open)
    # Per sampled request: d = cost - floor, x = allowance; sums from the store's moments.
    c1, c2, c3 = rate_in, rate_cached, rate_out
    f, o, sl = floor_rate, rate_out, slack
    n = s.n
    sum_d = s.sum_uncached * c1 + s.sum_cached * c2 + s.sum_output * c3 - s.sum_input * f
    sum_x = s.sum_limit * o + n * sl
    # Second moments of d and x, expanded over the token columns.
    m = s.moments  # E[a*b] sums over the sampled rows, keyed by column pair
    d_coef = {"u": c1, "c": c2, "o": c3, "i": -f}
    x_coef = {"l": o, "1": sl}

    def cross(p: dict[str, float], q: dict[str, float]) -> float:
        return sum(a * b * m[_key(k, j)] for k, a in p.items() for j, b in q.items())

    sum_dd, sum_xx, sum_dx = cross(d_coef, d_coef), cross(x_coef, x_coef), cross(d_coef, x_coef)
    if sum_x > 0:
        ratio = sum_d / sum_x
        resid = sum_dd - 2 * ratio * sum_dx + ratio * ratio * sum_xx
        point_open = floor_open + ratio * allowance_open
        # Open requests with larger allowances than the sampled ones carry more error.
        adjust = (allowance_open / s.open / (sum_x / n)) ** 2
    else:
        ratio = sum_d / n
        resid = sum_dd - n * ratio * ratio
        point_open = floor_open + ratio * s.open
        adjust = 1.0
    s2 = max(resid, 0.0) / (n - 1)
    # N^2 (1 - n/N) s^2 / n, which is N x open x s^2 / n: the error of the open requests' total
    # (the sampled ones are known exactly).
    var = (n + s.open) * s.open * s2 / n * adjust
    # Cached input can bring a request under its floor; nothing brings the open ones below 0.
    return _Estimate(known, point_open, var, n - 1, 0.0, worst_open)


_COLUMNS = ("u", "c", "o", "i", "l", "1")


def _key(a: str, b: str) -> str:
    return "".join(sorted((a, b), key=_COLUMNS.index))


def project(store: Store, job_id: int, table: PriceTable, until: float | None = None) -> Projection:
    """The job's projected total from its results so far (see the module's docstring), or
    from those finished by ``until`` (epoch seconds): what a projection said then."""
    strata = store.model_samples(job_id, open_from(store, job_id, table), until)
    sync: dict[str, list[_Estimate]] = {}
    batch: dict[str, list[_Estimate]] = {}
    sums: dict[str, list[int]] = {}
    for (model, _), s in sorted(strata.items()):
        price = table.resolve(model)
        sync.setdefault(model, []).append(_lane(price, s, False))
        batch.setdefault(model, []).append(_lane(price, s, True))
        bounds = price.bounds(s.all_input, s.all_limit, requests=s.requests)
        batch_bounds = price.bounds(s.all_input, s.all_limit, requests=s.requests, batch=True)
        acc = sums.setdefault(model, [0] * 6)
        for i, v in enumerate((s.requests, s.n, *bounds, *batch_bounds)):
            acc[i] += v
    by_model = {
        model: ModelProjection(
            model, acc[0], acc[1], _combine(sync[model]), _combine(batch[model]), *acc[2:]
        )
        for model, acc in sums.items()
    }
    return Projection(
        sum(m.requests for m in by_model.values()),
        sum(m.sampled for m in by_model.values()),
        _combine([e for es in sync.values() for e in es]),
        _combine([e for es in batch.values() for e in es]),
        by_model,
    )
