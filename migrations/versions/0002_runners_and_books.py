"""Runners instead of a job lease, the job's books kept on its row, result flags, events.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD/DROP COLUMN (SQLite >= 3.35, PostgreSQL): a batch rebuild of a table would trip
    # the foreign keys that point at it.
    op.add_column(
        "jobs", sa.Column("settled_pico", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column(
        "jobs", sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column("jobs", sa.Column("prices_fingerprint", sa.String(64)))
    op.add_column("jobs", sa.Column("paused_until", sa.Float, nullable=False, server_default="0"))
    op.drop_column("jobs", "lease_owner")
    op.drop_column("jobs", "lease_expires")
    op.add_column("requests", sa.Column("runner_id", sa.Integer))
    op.add_column(
        "requests", sa.Column("unbounded", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.add_column(
        "requests", sa.Column("batch_worst_pico", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column("results", sa.Column("flags", sa.Text))
    op.create_table(
        "runners",
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
    )
    op.create_index("ix_runners_job_state", "runners", ["job_id", "state"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("runner_id", sa.Integer),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_events_job_at", "events", ["job_id", "at"])
    # The books of existing jobs, from the ledger and the open reservations.
    op.execute(
        "UPDATE jobs SET settled_pico = COALESCE((SELECT SUM(amount_pico) FROM ledger "
        "WHERE ledger.job_id = jobs.id), 0), reserved_pico = COALESCE((SELECT "
        "SUM(reserved_pico) FROM requests WHERE requests.job_id = jobs.id AND "
        "requests.state = 'reserved'), 0)"
    )
    op.execute("UPDATE requests SET batch_worst_pico = worst_pico")


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("runners")
    op.drop_column("results", "flags")
    for column in ("batch_worst_pico", "unbounded", "runner_id"):
        op.drop_column("requests", column)
    op.add_column("jobs", sa.Column("lease_owner", sa.String(64)))
    op.add_column("jobs", sa.Column("lease_expires", sa.Float))
    for column in ("paused_until", "prices_fingerprint", "reserved_pico", "settled_pico"):
        op.drop_column("jobs", column)
