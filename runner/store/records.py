"""The values that cross the store's boundary: rows in, rows out, and request states.

Plain dataclasses with no database code, so the planner and the reports can use them without
importing SQLAlchemy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..budgets import BudgetBooks, JobDraw
from ..calibration import ModelCalibration


class RequestState(enum.StrEnum):
    """Where one request of a job stands."""

    PENDING = "pending"  # not sent yet, or handed back for a later try
    RESERVED = "reserved"  # claimed by a runner: its worst case is held against the cap
    DONE = "done"  # has its result
    FAILED = "failed"  # failed for good (the API refused it, or attempts ran out)


OPEN_STATES = (RequestState.PENDING, RequestState.RESERVED)


class ResultFlag(enum.StrEnum):
    """Remarks on a result that change how it was booked."""

    USAGE_MISSING = "usage_missing"  # no readable usage: charged at worst case
    OVER_RESERVATION = "over_reservation"  # billed more than its reserved worst case
    REUSED = "reused"  # copied from an earlier job's identical request; not spent again
    BATCH = "batch"  # came back through the Batch API, billed at batch prices
    # Served (as the response reports) and billed at service tier flex through the synchronous
    # API: the flex lane of ``--via auto``, or a request that asked for flex itself.
    FLEX = "flex"
    # The response named a model (kept in ``response_model``) or reported a service tier that
    # the price table has no prices for: charged at worst case.
    UNPRICED_MODEL = "unpriced_model"
    UNPRICED_TIER = "unpriced_tier"
    # The request asked for JSON (a JSON schema, or JSON mode) and its output does not parse,
    # or parses and does not match the schema (see ``structured``): still a result, billed;
    # the reason is in the result's ``error_message``, the flag also in its ``error_code``.
    OUTPUT_NOT_JSON = "output_not_json"
    OUTPUT_MISMATCH = "output_mismatch"


# The event ``--via auto --deadline`` records when it cancels the batches and goes sync.
SWITCH_EVENT = "deadline_switch"

# The flags of results whose outputs were not the JSON their requests asked for.
INVALID_OUTPUT_FLAGS = (ResultFlag.OUTPUT_NOT_JSON, ResultFlag.OUTPUT_MISMATCH)


@dataclass(frozen=True, slots=True)
class Requeued:
    """Finished requests queued again (``Store.requeue_invalid``): how many, what they were
    billed already, and what sending them again may cost at worst (sync and Batch API)."""

    requests: int
    billed_pico: int
    worst_pico: int
    batch_worst_pico: int


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    path: str
    sha256: str
    cap_pico: int
    state: str
    requests: int
    input_tokens: int
    output_limit_tokens: int
    floor_pico: int
    worst_pico: int
    created_at: float
    prices_fingerprint: str | None = None


@dataclass(slots=True)
class NewRequest:
    """One planned request, as imported from the job file."""

    seq: int
    line: int
    custom_id: str
    url: str
    model: str
    body: str
    input_tokens: int
    output_limit: int
    worst_pico: int
    floor_pico: int
    approximate: bool
    unbounded: bool = False
    batch_worst_pico: int = 0


@dataclass(slots=True)
class PendingRequest:
    """What a runner needs to send one request it has claimed."""

    id: int
    seq: int
    custom_id: str
    url: str
    model: str
    body: str
    input_tokens: int
    output_limit: int
    worst_pico: int  # the worst case reserved for it (at batch prices on the Batch API)
    attempts: int
    line: int = 0
    unbounded: bool = False


@dataclass(slots=True)
class AttemptRecord:
    request_id: int
    attempt: int
    started_at: float
    latency_ms: int
    status_code: int | None
    error_kind: str | None


@dataclass(slots=True)
class ResultRecord:
    """A request's final outcome: its result row, its ledger charge, its new state."""

    request_id: int
    state: RequestState  # DONE or FAILED
    attempts: int
    status_code: int | None
    body: str | None
    response_model: str | None
    api_request_id: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_pico: int
    latency_ms: int
    finished_at: float
    reserved_pico: int  # what was held for it, now released
    error_code: str | None = None
    error_message: str | None = None
    flags: tuple[ResultFlag, ...] = ()


@dataclass(slots=True)
class ChargeRecord:
    """An ``unknown`` charge: the request may have been billed and we cannot know for how much."""

    request_id: int
    amount_pico: int
    at: float


@dataclass(slots=True)
class ReleaseRecord:
    """Give a reservation back: the request was never sent, or will be tried again later."""

    request_id: int
    attempts: int
    last_error: str | None
    reserved_pico: int


@dataclass(slots=True)
class EventRecord:
    """Something that happened to the run as a whole (a rate-limit pause, an outage...)."""

    at: float
    kind: str
    seconds: float = 0.0
    detail: str | None = None


@dataclass(slots=True)
class Outcomes:
    """One group commit's worth of outcomes."""

    attempts: list[AttemptRecord] = field(default_factory=list)
    charges: list[ChargeRecord] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    releases: list[ReleaseRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.attempts or self.charges or self.results or self.releases or self.events)

    def rows(self) -> int:
        return len(self.results) + len(self.releases)


@dataclass(frozen=True, slots=True)
class Spend:
    settled_pico: int  # ledger total: actual costs plus unknown-outcome charges
    reserved_pico: int  # open reservations of requests being sent

    @property
    def total_pico(self) -> int:
        return self.settled_pico + self.reserved_pico


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim got: requests reserved under the cap, and why it stopped there."""

    requests: list[PendingRequest]
    spend: Spend
    cap_pico: int
    blocked: bool  # the next pending request does not fit under the cap now
    exhausted: bool  # no pending request was left to claim
    # The budget the claim drew on, its period's books after the claim; and whether the
    # budget (not the job's cap) is what the next request did not fit under.
    budget: BudgetBooks | None = None
    budget_blocked: bool = False


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    """One runner registered on a job."""

    id: int
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    expires_at: float
    in_flight: int  # requests on the wire at its last heartbeat
    state: str
    via: str
    holding: int = 0  # requests it has claimed (reserved) and not settled
    share: float = 1.0  # its share of the rate limits (see reads.Sharing)
    seen_ago: float = 0.0  # seconds since its last heartbeat (database clock)
    # Its heartbeat expired: killed or cut off, not yet declared dead by another runner (the
    # next run or runner takes over what it holds).
    expired: bool = False


@dataclass(frozen=True, slots=True)
class Beat:
    """What a heartbeat learned about the job it is running."""

    alive: bool  # False: this runner was declared dead and its claims recovered
    live_runners: int
    paused_until: float  # a rate-limit pause another runner shared (epoch seconds)
    share: float = 0.0  # this runner's share of the rate limits now (see reads.Sharing)
    others_sending: int = 0  # other live runners that hold claims (are sending)


@dataclass(slots=True)
class BatchInfo:
    """One Batch API batch of a job (a chunk of its requests), as the store keeps it."""

    id: int  # the chunk id
    job_id: int
    tag: str  # unique; in the batch's metadata and its input file's name
    url: str
    model: str
    state: str  # prepared, submitted, closed, abandoned (see ``schema.batches``)
    requests: int
    bytes: int
    input_tokens: int
    worst_pico: int
    prepared_at: float
    watcher: int | None = None
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None  # the API's status, as last seen
    total: int = 0
    completed: int = 0
    failed: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float | None = None
    expires_at: float | None = None
    closed_at: float | None = None
    error: str | None = None

    @property
    def open(self) -> bool:
        return self.state in ("prepared", "submitted")


@dataclass(slots=True)
class JobStatus:
    """Everything ``batchrun status`` shows about one job."""

    job: Job
    states: dict[str, int]
    spend: Spend
    unknown_pico: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    done_output_limit: int  # sum of output limits of the finished requests
    errors: dict[str, int]  # error kind or code -> count (final failures and retried attempts)
    pending_worst_pico: int
    pending_floor_pico: int
    reused: int = 0
    reused_pico: int = 0
    usage_missing: int = 0
    # Results whose response named a model the price table does not know (model -> results),
    # and those that reported a service tier without prices: booked at worst case.
    unpriced_models: dict[str, int] = field(default_factory=dict)
    unpriced_tiers: int = 0
    # Results whose outputs do not parse as the JSON their requests asked for, or do not match
    # its schema (billed, still done): ``run --retry-failed --invalid`` sends them again.
    outputs_not_json: int = 0
    outputs_mismatch: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)
    runners: list[RunnerInfo] = field(default_factory=list)
    batches: list[BatchInfo] = field(default_factory=list)  # Batch API batches, oldest first
    in_batches: int = 0  # reserved requests held by open Batch API batches
    # model -> the largest ratios its results were billed at (see ``calibration``)
    calibration: dict[str, ModelCalibration] = field(default_factory=dict)
    # Results by the lane they came back through ("batch", "flex", "sync"): (results, cost),
    # and when a ``--deadline`` run switched from the batches to the synchronous API, if it did.
    lanes: dict[str, tuple[int, int]] = field(default_factory=dict)
    switched_at: float | None = None
    # What the job will really cost (a ``projection.Projection``), from the results in: set by
    # a reader that has the price table (the store has none), else None.
    projection: Any = None
    # The budgets the job draws on (its runners and its booked spend), their current period;
    # with this job's share of each.
    budgets: list[tuple[BudgetBooks, JobDraw]] = field(default_factory=list)


# The stratum (of a sample, a projection) of requests priced at their model's largest output;
# the others are numbered by the power of two their output limit rounds up to.
UNLIMITED_STRATUM = -1


@dataclass(slots=True)
class ModelSample:
    """One model's requests, as a projection reads them: token sums of all and of the open
    ones, and of the finished results with usage (the sample), with their second moments."""

    requests: int = 0
    all_input: int = 0
    all_limit: int = 0
    open: int = 0  # pending or reserved
    open_input: int = 0
    open_limit: int = 0
    n: int = 0  # finished with readable usage
    sum_uncached: int = 0  # billed input less cached
    sum_cached: int = 0
    sum_output: int = 0
    sum_input: int = 0  # counted input of the sampled requests
    sum_limit: int = 0
    other_pico: int = 0  # booked without usage, and unknown outcomes charged
    # Sums of products over the sample, keyed by the sorted pair of columns of "ucoil1"
    # (uncached, cached, output, input, limit, one).
    moments: dict[str, float] = field(default_factory=dict)

    @property
    def done_uncached(self) -> int:
        return self.sum_uncached

    @property
    def done_cached(self) -> int:
        return self.sum_cached

    @property
    def done_output(self) -> int:
        return self.sum_output


@dataclass(slots=True)
class ExportRow:
    seq: int
    custom_id: str
    state: str
    last_error: str | None
    status_code: int | None
    body: str | None
    api_request_id: str | None
    error_code: str | None
    error_message: str | None
    has_result: bool
    url: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_pico: int = 0
