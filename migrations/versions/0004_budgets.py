"""Budgets: named spending limits shared across jobs, their books per period, and the budget
period each reservation (and so each ledger row) belongs to.

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("amount_pico", sa.BigInteger, nullable=False),
        sa.Column("per", sa.String(8), nullable=False),
        sa.Column("tz", sa.Text, nullable=False, server_default="UTC"),
        sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "budget_periods",
        sa.Column(
            "budget_id",
            sa.Integer,
            sa.ForeignKey("budgets.id"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("start", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("settled_pico", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("reserved_pico", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("unknown_pico", sa.BigInteger, nullable=False, server_default="0"),
    )
    # Plain ADD COLUMN (nullable, no default: instant on SQLite and PostgreSQL, however many
    # rows); a batch rebuild would trip the foreign keys into these tables.
    op.add_column("runners", sa.Column("budget_id", sa.Integer))
    op.add_column("requests", sa.Column("budget_id", sa.Integer))
    op.add_column("requests", sa.Column("budget_period", sa.BigInteger))
    op.add_column("ledger", sa.Column("budget_id", sa.Integer))
    op.add_column("ledger", sa.Column("budget_period", sa.BigInteger))
    op.create_index("ix_ledger_budget", "ledger", ["budget_id", "budget_period"])


def downgrade() -> None:
    op.drop_index("ix_ledger_budget", "ledger")
    op.drop_column("ledger", "budget_period")
    op.drop_column("ledger", "budget_id")
    op.drop_column("requests", "budget_period")
    op.drop_column("requests", "budget_id")
    op.drop_column("runners", "budget_id")
    op.drop_table("budget_periods")
    op.drop_table("budgets")
