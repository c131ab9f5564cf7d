"""The Batch API backend: batches (chunks of a job's requests) and the chunk holding a request.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("tag", sa.String(32), nullable=False, unique=True),
        sa.Column("url", sa.String(64), nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("state", sa.String(12), nullable=False, server_default="prepared"),
        sa.Column("watcher", sa.Integer),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("input_tokens", sa.BigInteger, nullable=False),
        sa.Column("worst_pico", sa.BigInteger, nullable=False),
        sa.Column("file_id", sa.Text),
        sa.Column("batch_id", sa.Text),
        sa.Column("status", sa.String(16)),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_file_id", sa.Text),
        sa.Column("error_file_id", sa.Text),
        sa.Column("prepared_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float),
        sa.Column("expires_at", sa.Float),
        sa.Column("closed_at", sa.Float),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_batches_job_state", "batches", ["job_id", "state"])
    # Plain ADD COLUMN: a batch rebuild of ``requests`` would trip the foreign keys into it.
    op.add_column("requests", sa.Column("chunk_id", sa.Integer))
    op.create_index("ix_requests_chunk", "requests", ["chunk_id"])


def downgrade() -> None:
    op.drop_index("ix_requests_chunk", "requests")
    op.drop_column("requests", "chunk_id")
    op.drop_index("ix_batches_job_state", "batches")
    op.drop_table("batches")
