"""Every run and price option, with its default, in one place.

One dataclass per concern. The CLI builds them from its options (and takes each option's default
from here); nothing below the CLI declares a default of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DB = "batchrun.db"
DEMO_CAP_USD = "1.00"  # the cap of a --simulate run that names none (nothing is billed)


@dataclass(frozen=True, slots=True)
class Limits:
    """How fast requests may leave."""

    rpm: int | None = None  # requests per minute; None: learned from the API's headers
    tpm: int | None = None  # tokens per minute (prompt + n x output limit per request)
    # Most requests in flight at once. The pool sizes itself from the rate limit and the
    # latency it observes (in flight = rate x latency), up to this bound.
    concurrency: int = 512
    initial_concurrency: int = 32  # in flight before anything is known about the API


@dataclass(frozen=True, slots=True)
class Retry:
    """What happens when an attempt fails."""

    max_attempts: int = 6  # attempts per request; rate-limit 429s and refused connects are free
    backoff_base: float = 0.5  # seconds: full jitter up to base x 2^(attempt-1) ...
    backoff_max: float = 30.0  # ... capped here
    max_wait: float = 120.0  # longest wait a server's retry headers may impose at once
    outage_limit: float = 300.0  # seconds the API may stay unreachable before the run stops
    # Identical refusals of the first requests, in a row, that stop the run as a usage error
    # (a wrong base URL or key answers every request the same way).
    same_error_limit: int = 5


@dataclass(frozen=True, slots=True)
class Transport:
    """Where requests go and how long one may take."""

    base_url: str | None = None  # None: the client's default (https://api.openai.com/v1)
    timeout: float = 120.0  # seconds for a whole request, first byte to last
    # A flex request's (``service_tier: "flex"``, slower by design): OpenAI's flex guide raises
    # the client timeout to 15 minutes (shared/openai-api-facts.md, gathered 2026-12-03).
    flex_timeout: float = 900.0
    kind: str = "aiohttp"  # the openai client's transport: "aiohttp" or "httpx"


@dataclass(frozen=True, slots=True)
class Batching:
    """How a job travels through the OpenAI Batch API (``--via batch``)."""

    requests_per_batch: int = 50_000  # the API's limit
    bytes_per_batch: int = 200 * 1024 * 1024  # the API's limit on an input file
    poll_interval: float = 60.0  # longest wait between two status polls
    poll_first: float = 2.0  # first wait between polls; it backs off to poll_interval
    queue_tokens: int | None = None  # keep the enqueued input tokens per model under this many
    cancel: bool = False  # ``batchrun cancel``: cancel the open batches, record what they return


@dataclass(frozen=True, slots=True)
class Deadline:
    """``--via auto --deadline WHEN``: the cheapest finish by WHEN. The Batch API takes the
    job first; the open batches are cancelled (and the rest sent synchronously) once the time
    left comes down to what the requests not yet finished need through the synchronous API at
    the rate limits, planned ``1 + margin`` times longer, plus ``slack`` seconds."""

    spec: str | None = None  # as given: an ISO time, or a duration ("8h", "90s"); None: none
    at: float | None = None  # the deadline in epoch seconds (a duration counts from the run
    # that first gave it: the same command resumes against the same deadline)
    margin: float = 0.25  # the sync tail's time at the limits, planned this share longer
    # (retries, 429s, a limit shared with other work)
    slack: float = 15.0  # seconds on top: the last requests' latency
    # Seconds cancelling the open batches may take before their lines come back to pending
    # (the Batch API's "cancelling" state lasts "up to ~10 minutes": shared/openai-api-facts.md,
    # "Batch timing", gathered 2026-12-03). The switch comes this much earlier while batches
    # are open: the sync tail cannot send a line its cancelled batch still holds.
    cancel: float = 600.0
    # Flex lane (models the price table marks flex-capable): seconds one flex answer is
    # planned to take (flex is slower; the guide raises the client timeout to 15 min). The
    # batches are cancelled early enough for the flex lane's requests at the limits with this
    # latency (and the margin) and then the standard tail; flex falls back to standard when
    # the time left is down to the standard tail.
    flex_latency: float = 30.0
    tick: float = 1.0  # seconds between two looks at the plan while batches run


@dataclass(frozen=True, slots=True)
class Stopping:
    """How a run ends and how runners watch each other."""

    grace: float = 10.0  # seconds in-flight requests get after Ctrl-C / SIGTERM
    heartbeat_ttl: float = 30.0  # a runner silent this long is dead; its requests are retaken


@dataclass(frozen=True, slots=True)
class Calibrating:
    """How the cap keeps holding against a server that counts tokens its own way."""

    margin: float = 0.10  # reserve the largest billed/counted ratio seen, plus this share
    most: float = 4.0  # a ratio above this is no calibration (earlier turns billed): stop


@dataclass(frozen=True, slots=True)
class Sample:
    """``price --sample``: a seeded sample of the job, sent to project what the rest costs."""

    size: int | None = None  # requests; or
    share: float | None = None  # a share of the job's requests (0 to 1)
    seed: int = 0
    most: int = 10_000  # the largest sample


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything ``batchrun run`` needs."""

    cap_pico: int | None  # None (joining with --job): keep the job's cap
    jobfile: Path | None = None  # None: join the job ``job_id`` already in the database
    db: str = DEFAULT_DB
    job_id: int | None = None
    prices: Path | None = None
    # "sync": the worker pool; "batch": the OpenAI Batch API; "auto": the Batch API first,
    # then the worker pool for what the batches did not finish (or by ``deadline``)
    via: str = "sync"
    deadline: Deadline = field(default_factory=Deadline)
    reuse: bool = True  # copy results of unchanged rows from the job the file replaced
    retry_failed: frozenset[str] | None = None  # error codes to retry; empty set: every failure
    # With ``retry_failed``: also queue the results whose outputs were not the JSON their
    # requests asked for (billed: sent again, they are paid again).
    retry_invalid: bool = False
    allow_unbounded: bool = False
    # Stop the run (in order) at a response naming a model, or reporting a service tier, that
    # the price table has no prices for; by default it is booked at worst case and counted.
    strict_models: bool = False
    simulate: bool = False
    quiet: bool = False
    limits: Limits = field(default_factory=Limits)
    retry: Retry = field(default_factory=Retry)
    transport: Transport = field(default_factory=Transport)
    batching: Batching = field(default_factory=Batching)
    stopping: Stopping = field(default_factory=Stopping)
    calibrating: Calibrating = field(default_factory=Calibrating)
    sample: Sample | None = None  # send only a sample of the job (``price --sample``)
    # The budget this run draws on: a name, "none", or None for the database's default one.
    budget: str | None = None
    seed: int | None = None  # jitter seed, for reproducible tests


@dataclass(frozen=True, slots=True)
class Writer:
    """The group commit of outcomes (not user options: the engine's own rhythm)."""

    interval: float = 0.05  # seconds between commits
    rows: int = 1000  # commit sooner when this many outcomes wait


# The periods a budget may be per ("total": it never resets), and a new budget's period and
# time zone unless ``budget set`` names them (see ``budgets``).
BUDGET_PERIODS = ("day", "week", "month", "total")
BUDGET_PER = "month"
BUDGET_TZ = "UTC"
