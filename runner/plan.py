"""The plan: every request of a job priced before anything is sent.

One streaming pass over the job file turns each valid line into a ``NewRequest`` (exact input
tokens, output limit, worst-case cost) and adds it to per-model totals. ``price_job`` is the
dry-run behind ``batchrun price``; the engine feeds the same generator into the store.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PriceError
from .jobfile import JobLine, JobReader
from .pricing import Price, PriceTable
from .store import NewRequest
from .tokens import count_request


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
        self.requests += 1
        self.input_tokens += r.input_tokens
        self.output_limit_tokens += r.output_limit
        self.unlimited_requests += unlimited
        self.approximate_requests += r.approximate
        self.floor_pico += r.floor_pico
        self.worst_pico += r.worst_pico

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


class Planner:
    """Prices job lines one at a time, keeping the totals."""

    def __init__(self, table: PriceTable, path: str) -> None:
        self.table = table
        self.plan = Plan(path=path)
        self._seq = 0

    def price_of(self, model: str) -> Price:
        return self.table.resolve(model)

    def add(self, jl: JobLine) -> NewRequest:
        body = jl.body
        model = body["model"]
        price = self.table.resolve(model)
        count = count_request(jl.url, body)
        limit = output_limit(jl.url, body)
        unlimited = limit is None
        if limit is None:
            if price.max_output is None:
                raise PriceError(
                    f"{self.plan.path}:{jl.line}: body.model: {model!r} has no known max_output; "
                    "set an output limit on the request or max_output in your price file"
                )
            limit = price.max_output * body.get("n", 1)
        floor = count.tokens * price.input
        req = NewRequest(
            seq=self._seq,
            line=jl.line,
            custom_id=jl.custom_id,
            url=jl.url,
            model=model,
            body=jl.body_json,
            input_tokens=count.tokens,
            output_limit=limit,
            worst_pico=floor + limit * price.output,
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
        for note in count.notes:
            plan.approximate_parts[note] = plan.approximate_parts.get(note, 0) + 1
        return req


def plan_rows(reader: JobReader, planner: Planner) -> Iterator[NewRequest]:
    """Stream priced requests; raise JobFileError at the end if any line was invalid."""
    for jl in reader:
        yield planner.add(jl)
    reader.check()
    planner.plan.sha256 = reader.sha256


def open_job(path: str | Path, table: PriceTable) -> tuple[JobReader, Planner]:
    reader = JobReader(path, known_model=lambda m: table.lookup(m) is not None)
    return reader, Planner(table, str(path))


def price_job(path: str | Path, table: PriceTable) -> Plan:
    """Price a whole job file without sending or storing anything."""
    reader, planner = open_job(path, table)
    for _ in plan_rows(reader, planner):
        pass
    return planner.plan
