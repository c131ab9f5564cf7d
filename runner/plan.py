"""The plan: every request of a job priced before anything is sent.

One streaming pass over the job file (``plan_job``) counts each valid line's input tokens exactly,
reads its output limit and adds both to per-model sums; the sums are priced once at the end
(prices are linear, so the sum of per-request costs is the cost of the sums; a request asking
for a service tier is summed with its model's other requests of that tier, since each tier has
prices of its own). The dry run behind ``batchrun price`` asks for the totals only, which lets
it count many texts in one tokenizer call; the import behind ``batchrun run`` also asks for one
``NewRequest`` row per line, priced on its own for the cap. Both go through the same loop and
the same sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

from .endpoints import endpoint_for
from .errors import PriceError
from .jobfile import JobLine, JobReader
from .money import MAX_PICO, format_money, format_usd, pico_to_decimal
from .pricing import Price, PriceTable, tier_of
from .store import JobStatus, NewRequest
from .tokens import TextBatch, TokenCount, count_request

# A request whose input the counter cannot bound: earlier turns stored at OpenAI are billed as
# input but are not in the job file, so its actual cost may exceed any worst case.
UNBOUNDED_NOTES = frozenset({"conversation"})
# Told the requests and bytes read so far while a job file is read (see progress.Reading).
ReadProgress = Callable[[int, int], None]


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
    unbounded_requests: int = 0  # may cost more than their worst case (stored conversations)
    batch_floor_pico: int = 0  # the same at Batch API prices
    batch_worst_pico: int = 0
    unlimited_limit_tokens: int = 0  # the output tokens the unlimited requests are priced at ...
    unlimited_worst_pico: int = 0  # ... and what that is of the worst case

    def add(self, other: Totals) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class Plan:
    """What a job will cost, per model and in total."""

    path: str
    total: Totals = field(default_factory=Totals)
    by_model: dict[str, Totals] = field(default_factory=dict)
    approximate_parts: dict[str, int] = field(default_factory=dict)  # note -> requests
    sha256: str = ""
    # Requests priced at a service tier's own prices (flex, priority): tier -> requests.
    tiers: dict[str, int] = field(default_factory=dict)
    # Per model, the requests that ask for no service tier of their own (what ``--via auto``
    # may send at flex for a flex-capable model).
    standard_by_model: dict[str, Totals] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.total.requests

    @property
    def floor_usd(self) -> Decimal:
        """Input alone, at synchronous prices (exact)."""
        return pico_to_decimal(self.total.floor_pico)

    @property
    def worst_usd(self) -> Decimal:
        """Input plus every output limit, at synchronous prices (exact)."""
        return pico_to_decimal(self.total.worst_pico)

    @property
    def batch_floor_usd(self) -> Decimal:
        return pico_to_decimal(self.total.batch_floor_pico)

    @property
    def batch_worst_usd(self) -> Decimal:
        return pico_to_decimal(self.total.batch_worst_pico)

    def min_seconds(self, rpm: int | None, tpm: int | None) -> float | None:
        """The least wall time the rate limits allow for this job.

        The API's buckets start full (one minute's worth) and refill continuously, so the
        first minute's worth goes at once and the rest at the limit's rate.
        """
        return least_seconds(
            self.total.requests,
            self.total.input_tokens + self.total.output_limit_tokens,
            rpm,
            tpm,
            burst=True,
        )

    def sustained_seconds(self, rpm: int | None, tpm: int | None) -> float | None:
        """The wall time at the limits' sustained rate, as for a key whose bucket is in use."""
        return least_seconds(
            self.total.requests,
            self.total.input_tokens + self.total.output_limit_tokens,
            rpm,
            tpm,
            burst=False,
        )


def least_seconds(
    requests: int, weight: int, rpm: int | None, tpm: int | None, *, burst: bool
) -> float | None:
    """Seconds the rate limits need for ``requests`` weighing ``weight`` tokens in all; with
    ``burst`` the buckets start full, so the first minute's worth goes at once."""
    bounds = []
    if rpm:
        bounds.append(max(0, requests - (rpm if burst else 0)) / rpm * 60)
    if tpm:
        bounds.append(max(0, weight - (tpm if burst else 0)) / tpm * 60)
    return max(bounds) if bounds else None


@dataclass(frozen=True, slots=True)
class Estimate:
    """What ``run`` says before it sends: the job's cost against its cap, and how long the
    rate limits make it take. Computed by ``run`` from the plan and the store."""

    job_id: int
    db: str
    requests: int
    floor_pico: int
    worst_pico: int
    cap_pico: int
    spent_pico: int
    pending: int
    pending_worst_pico: int
    fits: int  # pending requests that fit under the cap at worst case, in file order
    projected_fits: int | None  # ... at the output ratio seen so far (None: nothing seen yet)
    imported: bool  # False: resumed
    orphans: int = 0  # requests in flight when an earlier run died, charged at worst case
    orphan_pico: int = 0
    repriced: int = 0  # pending requests whose worst case changed with the price table
    reused: int = 0  # requests whose results were copied from an earlier job
    min_seconds: float | None = None
    sustained_seconds: float | None = None
    via: str = "sync"  # the lane the figures above are at ("batch": Batch API prices) ...
    sync_floor_pico: int = 0  # ... and the job's floor and worst case at synchronous prices
    sync_worst_pico: int = 0
    in_batches: int = 0  # requests held by open Batch API batches ...
    open_batches: int = 0  # ... in so many batches (a run with nothing to send waits for them)
    budget_name: str | None = None  # the budget the run draws on, what it has left ...
    budget_left_pico: int = 0
    budget_period: str = ""  # ... "this month" (``fits`` counts under it too)
    # ``--deadline``: not even all of it through the synchronous API at the limits finishes by
    # then (the question says so; the run then goes all sync, as fast as the limits allow).
    deadline_missed: bool = False
    sampling: bool = False  # ``price --sample``: only the sample is sent
    sample: int = 0  # the sample's requests still to send ...
    sample_worst_pico: int = 0  # ... and their worst case
    # What the job will really cost (``projection``), at the lane's prices, once two results
    # of a model are in: total, low and high of the 95% interval.
    projected: tuple[int, int, int] | None = None

    @property
    def finishes(self) -> bool:
        return self.fits >= self.pending


class _ModelSums:
    """Running sums for one model at one service tier (None: standard prices)."""

    __slots__ = ("batch", "model", "price", "tier", "totals")

    def __init__(self, model: str, price: Price, tier: str | None = None) -> None:
        self.model = model
        self.price = price
        self.tier = tier
        self.batch = TextBatch()
        self.totals = Totals()


def _limit_of(path: str, jl: JobLine, price: Price) -> tuple[int, bool]:
    """The output tokens a line is priced at, and whether it set no limit of its own."""
    endpoint = endpoint_for(jl.url)
    assert endpoint is not None  # the reader only yields supported urls
    limit = endpoint.output_limit(jl.body)
    if limit is not None:
        return limit, False
    if price.max_output is None:
        raise PriceError(
            f"{path}:{jl.line}: body.model: {jl.body['model']!r} has no known max_output; set an "
            "output limit on the request or max_output in your price file"
        )
    return price.max_output * endpoint.choices(jl.body), True


# The plain texts of up to CHUNK_LINES lines are set aside (tokens.TextBatch) and counted in one
# tokenizer call per model and chunk: exact, and cheaper than one call per text. The import gets
# each text's count from the same call (split at the separators) and adds them up per line.
CHUNK_LINES = 4096  # lines whose texts are counted together, at most ...
CHUNK_CHARS = 1 << 20  # ... and characters of text set aside per model, at most


# A line read and priced but for the texts it set aside in its model's batch (its body itself
# is not kept, only what its row stores): a plain tuple, built once per line on the import path.
# (line, custom_id, url, body_json, model sums, tokens but those texts, approximate, output
#  limit, unbounded, first, last): its texts are the model batch's texts[first:last].
_Held = tuple[int, str, str, str, "_ModelSums", int, bool, int, bool, int, int]


class _Chunk(NamedTuple):
    """Lines whose texts are being counted, and the counting: per model, a total or (the
    import) each text's count, to come."""

    held: list[_Held]
    work: list[tuple[_ModelSums, int | Future[list[int]]]]


class Planner:
    """Prices the lines of one job file into a ``Plan``; see ``plan_job``."""

    def __init__(
        self, reader: JobReader, table: PriceTable, progress: ReadProgress | None = None
    ) -> None:
        self.reader = reader
        self.table = table
        self.progress = progress  # told (requests, bytes) read so far, once per chunk
        self.plan = Plan(path=reader.display_path)
        self._sums: dict[tuple[str, str | None], _ModelSums] = {}
        self._seq = 0  # the next row's place in the file

    def _sums_for(self, model: str, tier: str | None) -> _ModelSums:
        key = (model, tier)
        acc = self._sums.get(key)
        if acc is None:
            acc = self._sums[key] = _ModelSums(model, self.table.resolve(model), tier)
        return acc

    def _note(self, count: TokenCount) -> None:
        parts = self.plan.approximate_parts
        for note in count.notes:
            parts[note] = parts.get(note, 0) + 1

    def rows(self, *, keep_rows: bool) -> Iterator[NewRequest]:
        """Read the whole file, filling ``plan``; yield a priced row per line if ``keep_rows``.

        Both ways set the plain texts of up to ``CHUNK_LINES`` lines aside and count them in one
        tokenizer call per model and chunk. The import counts each text (``TextBatch.counts``)
        on a helper thread while the next chunk is read (the tokenizer runs without the GIL),
        and yields a chunk's rows, each with the tokens of its own texts, once they are
        counted. Raises JobFileError at the end if any line was invalid.
        """
        path = self.plan.path
        held: list[_Held] = []  # the chunk's lines, waiting for their texts' counts
        counting = ThreadPoolExecutor(1, "batchrun-count") if keep_rows else None
        previous: _Chunk | None = None  # the chunk being counted meanwhile
        lines = 0
        try:
            for jl in self.reader:
                body = jl.body
                model = body["model"]
                acc = self._sums_for(model, tier_of(body) if "service_tier" in body else None)
                first = len(acc.batch.texts)
                count = count_request(jl.url, body, acc.batch)
                limit, unlimited = _limit_of(path, jl, acc.price)
                unbounded = bool(UNBOUNDED_NOTES.intersection(count.notes))
                t = acc.totals
                t.requests += 1
                t.input_tokens += count.tokens
                t.output_limit_tokens += limit
                t.unlimited_requests += unlimited
                if unlimited:
                    t.unlimited_limit_tokens += limit
                t.approximate_requests += count.approximate
                t.unbounded_requests += unbounded
                if count.notes:
                    self._note(count)
                if keep_rows:
                    held.append(
                        (
                            jl.line, jl.custom_id, jl.url, jl.body_json, acc, count.tokens,
                            count.approximate, limit, unbounded, first, len(acc.batch.texts),
                        )
                    )  # fmt: skip
                lines += 1
                if lines >= CHUNK_LINES or acc.batch.chars >= CHUNK_CHARS:
                    if self.progress is not None:
                        self.progress(self.reader.requests, self.reader.position)
                    chunk = self._close_chunk(held, counting)
                    held = []
                    if previous is not None:
                        yield from self._priced(previous)
                    previous = chunk
                    lines = 0
            self.reader.check()
            chunk = self._close_chunk(held, counting)
            for c in (previous, chunk):
                if c is not None:
                    yield from self._priced(c)
        finally:
            if counting is not None:
                counting.shutdown(wait=True, cancel_futures=True)
        self._finish()

    def _close_chunk(self, held: list[_Held], counting: ThreadPoolExecutor | None) -> _Chunk:
        """Take the texts set aside (each model starts a new batch) and count them: their
        total now, or (the import) each one's count on the helper thread."""
        work: list[tuple[_ModelSums, int | Future[list[int]]]] = []
        for acc in self._sums.values():
            if acc.batch.texts:
                batch, acc.batch = acc.batch, TextBatch()
                work.append(
                    (acc, batch.count() if counting is None else counting.submit(batch.counts))
                )
        return _Chunk(held, work)

    def _priced(self, chunk: _Chunk) -> Iterator[NewRequest]:
        """Add a chunk's counts to the totals, then price and yield its held lines."""
        each: dict[int, list[int]] = {}
        for acc, counted in chunk.work:
            if isinstance(counted, int):
                acc.totals.input_tokens += counted
            else:
                counts = each[id(acc)] = counted.result()
                acc.totals.input_tokens += sum(counts)
        seq = self._seq
        for line, cid, url, body, acc, tokens, approx, limit, unbounded, first, last in chunk.held:
            counts = each.get(id(acc))
            if counts:
                tokens += sum(counts[first:last])
            price = acc.price
            floor, worst = price.bounds(tokens, limit, tier=acc.tier)
            if worst > MAX_PICO:
                raise PriceError(
                    f"{self.plan.path}:{line}: body: its worst case ({format_money(worst)}) is "
                    f"more than batchrun can book ({format_usd(MAX_PICO)}); lower its "
                    "output limit"
                )
            yield NewRequest(
                seq, line, cid, url, acc.model, body, tokens, limit, worst, floor, approx,
                unbounded, price.bounds(tokens, limit, batch=True)[1],
            )  # fmt: skip
            seq += 1
        self._seq = seq

    def _finish(self) -> None:
        plan = self.plan
        plan.sha256 = self.reader.sha256
        for (model, tier), acc in self._sums.items():
            t = acc.totals
            sums = (t.input_tokens, t.output_limit_tokens)
            t.floor_pico, t.worst_pico = acc.price.bounds(*sums, requests=t.requests, tier=tier)
            t.batch_floor_pico, t.batch_worst_pico = acc.price.bounds(
                *sums, batch=True, requests=t.requests
            )
            t.unlimited_worst_pico = t.unlimited_limit_tokens * acc.price.rates(tier=tier)[2]
            if tier is not None:
                plan.tiers[tier] = plan.tiers.get(tier, 0) + t.requests
            else:
                plan.standard_by_model.setdefault(model, Totals()).add(t)
            if model in plan.by_model:
                plan.by_model[model].add(t)
            else:
                plan.by_model[model] = t
            plan.total.add(t)
        if plan.total.worst_pico > MAX_PICO:
            raise PriceError(
                f"{plan.path}: the job's worst case ({format_money(plan.total.worst_pico)}) is "
                f"more than batchrun can book ({format_usd(MAX_PICO)}); split the job or lower "
                "its output limits"
            )


def open_job(
    path: str | Path,
    table: PriceTable,
    *,
    keep_body_json: bool = True,
    progress: ReadProgress | None = None,
) -> tuple[JobReader, Planner]:
    """A reader for ``path`` that knows which models have prices, and its planner."""

    def known_tier(model: str, tier: str) -> str | None:
        try:
            table.resolve(model).rates(tier=tier_of({"service_tier": tier}))
        except PriceError as exc:
            return str(exc)
        return None

    reader = JobReader(
        path,
        known_model=lambda m: table.lookup(m) is not None,
        known_tier=known_tier,
        keep_body_json=keep_body_json,
    )
    return reader, Planner(reader, table, progress)


def plan_rows(planner: Planner) -> Iterator[NewRequest]:
    """Stream priced requests for the import; ``planner.plan`` holds the totals at the end."""
    return planner.rows(keep_rows=True)


def price_job(path: str | Path, table: PriceTable, progress: ReadProgress | None = None) -> Plan:
    """Price a whole job file without sending or storing anything."""
    _, planner = open_job(path, table, keep_body_json=False, progress=progress)
    for _ in planner.rows(keep_rows=False):
        pass
    return planner.plan


def projected_pico(status: JobStatus) -> int:
    """Spent so far, plus what is left with its output allowance used at the ratio observed in
    finished requests (the worst case until something has finished)."""
    pending_out = status.pending_worst_pico - status.pending_floor_pico
    if status.done_output_limit:
        pending_out = pending_out * status.output_tokens // status.done_output_limit
    return status.spend.settled_pico + status.pending_floor_pico + pending_out
