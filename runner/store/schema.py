"""The tables, as SQLAlchemy Core metadata: what Alembic's environment compares against.

Dialect-neutral: integers for money (picodollars), floats for epoch seconds, text for JSON.
The migrations in ``migrations/versions`` create exactly these tables on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("cap_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("state", sa.String(16), nullable=False, server_default="new"),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_limit_tokens", sa.BigInteger, nullable=False),
    sa.Column("floor_pico", sa.BigInteger, nullable=False),
    sa.Column("worst_pico", sa.BigInteger, nullable=False),
    # The job's books, kept in step with the ledger and the reservations in the same
    # transactions, so a claim reads them in one row instead of summing millions.
    sa.Column("settled_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("prices_fingerprint", sa.String(64)),
    # A rate-limit pause one runner met, shared with the others (epoch seconds).
    sa.Column("paused_until", sa.Float, nullable=False, server_default="0"),
)

runners = sa.Table(
    "runners",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("via", sa.String(16), nullable=False, server_default="sync"),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
    sa.Column("state", sa.String(12), nullable=False, server_default="live"),
    sa.Column("budget_id", sa.Integer),  # the budget its claims draw on (see ``budgets``)
    sa.Index("ix_runners_job_state", "job_id", "state"),
)

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("line", sa.Integer, nullable=False),
    sa.Column("custom_id", sa.Text, nullable=False),
    sa.Column("url", sa.String(64), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("input_tokens", sa.Integer, nullable=False),
    sa.Column("output_limit", sa.Integer, nullable=False),
    sa.Column("worst_pico", sa.BigInteger, nullable=False),
    sa.Column("floor_pico", sa.BigInteger, nullable=False),
    sa.Column("approximate", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("state", sa.String(12), nullable=False, server_default="pending"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("runner_id", sa.Integer),  # who holds the reservation
    sa.Column("unbounded", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("batch_worst_pico", sa.BigInteger, nullable=False, server_default="0"),
    # The Batch API chunk that holds (or last held) it: a reserved request with a chunk and no
    # runner belongs to that chunk's batch, not to a runner (see ``batches``).
    sa.Column("chunk_id", sa.Integer),
    # The budget and period (its start) its reservation was made in: its cost is booked there.
    sa.Column("budget_id", sa.Integer),
    sa.Column("budget_period", sa.BigInteger),
    sa.UniqueConstraint("job_id", "seq", name="uq_requests_job_seq"),
    sa.UniqueConstraint("job_id", "custom_id", name="uq_requests_job_custom_id"),
    sa.Index("ix_requests_job_state_seq", "job_id", "state", "seq"),
    sa.Index("ix_requests_chunk", "chunk_id"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Integer, nullable=False),
    sa.Column("status_code", sa.Integer),
    sa.Column("error_kind", sa.String(32)),
    sa.Index("ix_attempts_request", "request_id"),
)

results = sa.Table(
    "results",
    metadata,
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id"), primary_key=True),
    sa.Column("status_code", sa.Integer),
    sa.Column("body", sa.Text),
    sa.Column("response_model", sa.Text),
    sa.Column("api_request_id", sa.Text),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cached_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Integer, nullable=False, server_default="0"),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("error_code", sa.Text),
    sa.Column("error_message", sa.Text),
    sa.Column("flags", sa.Text),  # comma-separated ResultFlag values
)


def flagged(flag: str) -> sa.ColumnElement[bool]:
    """Results carrying ``flag`` (a ``ResultFlag``; ``results.flags`` is comma-separated)."""
    return sa.func.coalesce(results.c.flags, "").like(f"%{flag}%")


ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id")),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount_pico", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    # The budget period the charge belongs to (that of the request's reservation), if any.
    sa.Column("budget_id", sa.Integer),
    sa.Column("budget_period", sa.BigInteger),
    sa.Index("ix_ledger_job", "job_id"),
    sa.Index("ix_ledger_budget", "budget_id", "budget_period"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("runner_id", sa.Integer),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("detail", sa.Text),
    sa.Index("ix_events_job_at", "job_id", "at"),
)

# One Batch API batch of a job (a "chunk" of its requests), from the intent to submit it (its
# requests and tag recorded before anything is uploaded) until its results are recorded.
batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("tag", sa.String(32), nullable=False, unique=True),  # in the metadata and file name
    sa.Column("url", sa.String(64), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    # prepared (intent recorded; the batch may or may not exist) -> submitted -> closed, or
    # abandoned (it was never created; its requests went back to pending)
    sa.Column("state", sa.String(12), nullable=False, server_default="prepared"),
    sa.Column("watcher", sa.Integer),  # the runner polling it
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("worst_pico", sa.BigInteger, nullable=False),
    sa.Column("file_id", sa.Text),
    sa.Column("batch_id", sa.Text),
    sa.Column("status", sa.String(16)),  # the API's status, as last seen
    sa.Column("total", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("output_file_id", sa.Text),
    sa.Column("error_file_id", sa.Text),
    sa.Column("prepared_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float),  # the batch's created_at at the API
    sa.Column("expires_at", sa.Float),
    sa.Column("closed_at", sa.Float),
    sa.Column("error", sa.Text),
    sa.Index("ix_batches_job_state", "job_id", "state"),
)

# A named spending limit shared by every job that draws on it (see ``runner.budgets``).
budgets = sa.Table(
    "budgets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("amount_pico", sa.BigInteger, nullable=False),
    sa.Column("per", sa.String(8), nullable=False),  # day, week, month, total
    sa.Column("tz", sa.Text, nullable=False, server_default="UTC"),
    sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

# A budget's books for one period, kept in step with the ledger and the reservations in the
# same transactions (as a job's are on its row), so a claim reads one row.
budget_periods = sa.Table(
    "budget_periods",
    metadata,
    sa.Column(
        "budget_id", sa.Integer, sa.ForeignKey("budgets.id"), primary_key=True, autoincrement=False
    ),
    sa.Column("start", sa.BigInteger, primary_key=True, autoincrement=False),  # epoch s; total: 0
    sa.Column("settled_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unknown_pico", sa.BigInteger, nullable=False, server_default="0"),
)
