"""The plan: every request of a job priced before anything is sent.

One streaming pass over the job file turns each valid line into a ``NewRequest`` (exact input
tokens, output limit, worst-case cost) and adds it to per-model totals: ``plan_rows``, which the
import feeds into the store. ``price_job``, the dry-run behind ``batchrun price``, computes the
same totals without the per-line rows (see there).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PriceError
from .jobfile import JobLine, JobReader
from .pricing import Price, PriceTable
from .store import NewRequest
from .tokens import TextBatch, count_request


@dataclass(slots=True)
class Totals:
    """Sums over a set of requests (one model, or the whole job)."""

    requests: int = 0
    input_tokens: int = 0
    output_limit_tokens: int = 0
    unlimited_requests: int = 0  # no output limit: priced at the model's largest output
    approximate_requests: int = 0  # some part (tools, images, ...) was estimated
    floor_pico: int = 0  # input only
    worst_pico: int = 0  # input + every output limit

    def add(self, r: NewRequest, unlimited: bool) -> None:
        self.add_counts(
            1, r.input_tokens, r.output_limit, unlimited, r.approximate, r.floor_pico, r.worst_pico
        )

    def add_counts(
        self,
        requests: int,
        input_tokens: int,
        output_limit_tokens: int,
        unlimited_requests: int,
        approximate_requests: int,
        floor_pico: int,
        worst_pico: int,
    ) -> None:
        self.requests += requests
        self.input_tokens += input_tokens
        self.output_limit_tokens += output_limit_tokens
        self.unlimited_requests += unlimited_requests
        self.approximate_requests += approximate_requests
        self.floor_pico += floor_pico
        self.worst_pico += worst_pico

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_limit_tokens": self.output_limit_tokens,
            "unlimited_requests": self.unlimited_requests,
            "approximate_requests": self.approximate_requests,
            "floor_pico": self.floor_pico,
            "worst_pico": self.worst_pico,
        }


@dataclass(slots=True)
class Plan:
    """What a job will cost, per model and in total."""

    path: str
    total: Totals = field(default_factory=Totals)
    by_model: dict[str, Totals] = field(default_factory=dict)
    approximate_parts: dict[str, int] = field(default_factory=dict)  # note -> requests
    sha256: str = ""

    def min_seconds(self, rpm: int | None, tpm: int | None) -> float | None:
        """The least wall time the rate limits allow for this job.

        The API's buckets start full (one minute's worth) and refill continuously, so the
        first minute's worth goes at once and the rest at the limit's rate.
        """
        bounds = []
        if rpm:
            bounds.append(max(0, self.total.requests - rpm) / rpm * 60)
        if tpm:
            weight = self.total.input_tokens + self.total.output_limit_tokens
            bounds.append(max(0, weight - tpm) / tpm * 60)
        return max(bounds) if bounds else None


def output_limit(url: str, body: dict[str, Any]) -> int | None:
    """The most output tokens a request may be billed for, or None when it sets no limit."""
    if url == "/v1/embeddings":
        return 0
    if url == "/v1/responses":
        return body.get("max_output_tokens")
    limit = body.get("max_completion_tokens")
    if limit is None:
        limit = body.get("max_tokens")
    if limit is None:
        return None
    return limit * body.get("n", 1)


def cost(price: Price, input_tokens: int, output_tokens: int) -> tuple[int, int]:
    """(floor, worst case) in picodollars: input only, and input plus the output limit.

    Linear in the tokens, so it gives the same result for one request as for the sums over many
    requests of one model: ``price_job`` applies it once per model, ``Planner.add`` per request.
    """
    floor = input_tokens * price.input
    return floor, floor + output_tokens * price.output


class Planner:
    """Prices job lines one at a time, keeping the totals."""

    def __init__(self, table: PriceTable, path: str) -> None:
        self.table = table
        self.plan = Plan(path=path)
        self._seq = 0

    def limit_of(self, jl: JobLine, price: Price) -> tuple[int, bool]:
        """The output tokens a line is priced at, and whether it set no limit of its own."""
        limit = output_limit(jl.url, jl.body)
        if limit is not None:
            return limit, False
        if price.max_output is None:
            raise PriceError(
                f"{self.plan.path}:{jl.line}: body.model: {jl.body['model']!r} has no known "
                "max_output; set an output limit on the request or max_output in your price file"
            )
        return price.max_output * jl.body.get("n", 1), True

    def add(self, jl: JobLine) -> NewRequest:
        """Price one line for the store; add it to the plan's totals."""
        body = jl.body
        model = body["model"]
        price = self.table.resolve(model)
        count = count_request(jl.url, body)
        limit, unlimited = self.limit_of(jl, price)
        floor, worst = cost(price, count.tokens, limit)
        req = NewRequest(
            seq=self._seq,
            line=jl.line,
            custom_id=jl.custom_id,
            url=jl.url,
            model=model,
            body=jl.body_json,
            input_tokens=count.tokens,
            output_limit=limit,
            worst_pico=worst,
            floor_pico=floor,
            approximate=count.approximate,
        )
        self._seq += 1
        plan = self.plan
        plan.total.add(req, unlimited)
        per_model = plan.by_model.get(model)
        if per_model is None:
            per_model = plan.by_model[model] = Totals()
        per_model.add(req, unlimited)
        _count_notes(plan, count.notes)
        return req


def _count_notes(plan: Plan, notes: tuple[str, ...]) -> None:
    for note in notes:
        plan.approximate_parts[note] = plan.approximate_parts.get(note, 0) + 1


def plan_rows(reader: JobReader, planner: Planner) -> Iterator[NewRequest]:
    """Stream priced requests; raise JobFileError at the end if any line was invalid."""
    for jl in reader:
        yield planner.add(jl)
    reader.check()
    planner.plan.sha256 = reader.sha256


def open_job(
    path: str | Path, table: PriceTable, *, keep_body_json: bool = True
) -> tuple[JobReader, Planner]:
    reader = JobReader(
        path, known_model=lambda m: table.lookup(m) is not None, keep_body_json=keep_body_json
    )
    return reader, Planner(table, str(path))


# price_job sets the plain texts of up to CHUNK_LINES lines aside (tokens.TextBatch) and counts
# them in one tokenizer call per chunk: exact, and ~10% cheaper than one call per text. With
# threads=1 a worker thread counts a chunk (tiktoken releases the GIL) while the next is read.
CHUNK_LINES = 4096  # lines whose texts are counted together, at most ...
CHUNK_CHARS = 1 << 20  # ... and characters of text set aside per model, at most


class _ModelSums:
    """Running sums for one model in ``price_job``."""

    __slots__ = ("approximate", "batch", "limits", "price", "requests", "tokens", "unlimited")

    def __init__(self, price: Price) -> None:
        self.price = price
        self.batch = TextBatch()
        self.requests = self.tokens = self.limits = self.unlimited = self.approximate = 0


def price_job(path: str | Path, table: PriceTable, *, threads: int = 0) -> Plan:
    """Price a whole job file without sending or storing anything.

    The same numbers as summing ``Planner.add`` over every line, without building a request
    row (or the body's JSON) per line: per model it sums tokens and output limits, and prices
    the sums once at the end (``cost`` is linear, so the totals are identical).

    ``threads`` > 0 counts each chunk's texts in that many worker threads while the calling
    thread reads on (at most ``threads + 1`` chunks in flight; when the workers fall behind,
    the calling thread counts a chunk itself instead of waiting). It pays only with a free core:
    on the shared 2-core benchmark machine it ranged from 1.5x faster to 2.3x slower than
    ``threads=0`` (GIL hand-offs to a thread that is not scheduled), so it is off by default;
    see bench/RESULTS.md.
    """
    reader, planner = open_job(path, table, keep_body_json=False)
    plan = planner.plan
    sums: dict[str, _ModelSums] = {}
    pool = ThreadPoolExecutor(threads, thread_name_prefix="batchrun-count") if threads else None
    in_flight = threads + 1
    pending: deque[tuple[_ModelSums, Future[int]]] = deque()

    def flush() -> None:
        for acc in sums.values():
            batch = acc.batch
            if not batch.texts:
                continue
            acc.batch = TextBatch()
            while pending and pending[0][1].done():
                done, future = pending.popleft()
                done.tokens += future.result()
            if pool is not None and len(pending) < in_flight:
                pending.append((acc, pool.submit(batch.count)))
            else:  # the worker is behind (no free core?): count here rather than wait for it
                acc.tokens += batch.count()

    try:
        lines = 0
        for jl in reader:
            body = jl.body
            model = body["model"]
            acc = sums.get(model)
            if acc is None:
                acc = sums[model] = _ModelSums(table.resolve(model))
                plan.by_model[model] = Totals()  # first-seen order, as Planner.add gives
            count = count_request(jl.url, body, acc.batch)
            limit = output_limit(jl.url, body)
            if limit is None:
                limit, _ = planner.limit_of(jl, acc.price)
                acc.unlimited += 1
            acc.requests += 1
            acc.tokens += count.tokens
            acc.limits += limit
            if count.approximate:
                acc.approximate += 1
            if count.notes:
                _count_notes(plan, count.notes)
            lines += 1
            if lines >= CHUNK_LINES or acc.batch.chars >= CHUNK_CHARS:
                flush()
                lines = 0
        reader.check()
        flush()
        while pending:
            done, future = pending.popleft()
            done.tokens += future.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    plan.sha256 = reader.sha256
    for model, acc in sums.items():
        floor, worst = cost(acc.price, acc.tokens, acc.limits)
        counts = (acc.requests, acc.tokens, acc.limits, acc.unlimited, acc.approximate)
        plan.by_model[model].add_counts(*counts, floor, worst)
        plan.total.add_counts(*counts, floor, worst)
    return plan
